"""Shared fixtures: the tiny coloured-shapes caption set, and a subprocess runner."""
import os
import subprocess
from pathlib import Path
from typing import List

import pytest

import shapes_data


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory) -> dict:
    """30 image-caption pairs (tests/helpers/shapes_data.py) as a CSV with PNG files and as one shard."""
    return shapes_data.write(tmp_path_factory.mktemp("data"))


def _run(cmd: List[str], cwd: Path, timeout: int = 600, env: dict = None) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it exits non-zero."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def run():
    """``run(cmd, cwd, timeout=600, env=None)``: a subprocess that must succeed."""
    return _run


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's tensors are far too small to gain from intra-op threads; one is fastest."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
