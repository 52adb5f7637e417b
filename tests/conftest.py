"""Shared fixtures: a tiny image-caption set (coloured shapes) as PNG files, a CSV and a shard."""
import csv
import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import List, Tuple

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 20)}
SHAPES = ("square", "circle", "triangle", "bar", "cross")


def draw(colour: str, shape: str, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    c, m = COLOURS[colour], size // 5
    if shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=c)
    elif shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=c)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=c)
    elif shape == "bar":
        d.rectangle([m, size // 2 - m // 2, size - m, size // 2 + m // 2], fill=c)
    else:
        d.rectangle([size // 2 - m // 2, m, size // 2 + m // 2, size - m], fill=c)
        d.rectangle([m, size // 2 - m // 2, size - m, size // 2 + m // 2], fill=c)
    return img


def samples() -> List[Tuple[Image.Image, str]]:
    return [(draw(c, s), f"a {c} {s} on a white background") for c in COLOURS for s in SHAPES]


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory) -> dict:
    """30 image-caption pairs as a CSV (with PNG files) and as one webdataset shard."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for i, (img, caption) in enumerate(samples()):
            path = root / "images" / f"{i:04d}.png"
            path.parent.mkdir(exist_ok=True)
            img.save(path)
            rows.append({"filepath": str(path), "title": caption})
            for ext, payload in (("png", path.read_bytes()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return {"root": root, "csv": root / "train.csv", "shard": root / "shard-000000.tar", "count": len(rows)}


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
