"""``conlip-retrieval serve`` run for real on a loopback port, for the tests of what only a real server
shows: clip-retrieval's client over HTTP, timeouts, the request bound, and its logs. Its stdout and stderr
go to files (a pipe nobody reads could stall it), which the tests read."""
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

import pytest
import requests

STARTUP_S = 120  # importing torch and loading the model on two busy cores


class LiveServer:
    """A running server: its base URL (with a trailing slash) and its output so far."""

    def __init__(self, url: str, stdout: Path, stderr: Path):
        self.url, self.stdout, self.stderr = url, stdout, stderr
        self.host, self.port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
        self.port = int(self.port)

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()


@contextmanager
def live_server(index: Path, folder: Path, *flags: str) -> Iterator[LiveServer]:
    """``conlip-retrieval serve --index INDEX --port 0 FLAGS`` until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    cmd: List[str] = [sys.executable, "-m", "conlip_plugin.retrieval.cli", "serve", "--index", str(index),
                      "--port", "0", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    try:
        deadline = time.monotonic() + STARTUP_S
        url = None
        while url is None:
            found = re.search(r"at (http://\S+/) \(Ctrl\+C", stdout.read_text())
            url = found.group(1) if found else None
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve did not start ({' '.join(cmd)}):\n{stderr.read_text()[-4000:]}")
            time.sleep(0.2)
        while True:  # the address is printed just before uvicorn starts answering
            try:
                requests.get(url + "api/info", timeout=5)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve stopped:\n{stderr.read_text()[-4000:]}")
                time.sleep(0.2)
        yield LiveServer(url, stdout, stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
