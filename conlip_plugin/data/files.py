"""Small helpers every data tool shares: errors that name the fix, atomic writes, captions, stable hashes."""
import hashlib
import os
from pathlib import Path
from typing import Iterable, NoReturn

SHOWN = 5  # offending items named in an error message


def fail(message: str) -> NoReturn:
    """Stop with a message naming the problem and the fix (exit status 1)."""
    raise SystemExit(f"error: {message}")


def listing(items: list) -> str:
    """The first few items and how many more: error messages stay readable for a million bad files."""
    shown = ", ".join(str(i) for i in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def normalize_caption(raw: object) -> str:
    """Collapse all whitespace (newlines included) to single spaces; None is the empty caption.

    Flickr's annotation file and the CSV are line based, and stray whitespace is only noise to a tokenizer.
    """
    return " ".join(str(raw).split()) if raw is not None else ""


def write_atomic(path: Path, data: bytes, if_changed: bool = False) -> None:
    """Write via a synced temporary file and a rename, so an interrupted run never leaves a partial file.

    With ``if_changed`` an identical file is left alone, so that a rebuild keeps its files' times.
    """
    if if_changed and path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def require_files(paths: Iterable[Path], what: str, fix: str) -> None:
    """Fail naming every missing or empty file (the first few), so one run reports them all."""
    missing, empty = [], []
    for path in paths:
        try:
            size = path.stat().st_size  # follows symlinks: a dangling link counts as missing
        except OSError:
            missing.append(path)
            continue
        if size == 0:
            empty.append(path)
    problems = ([f"{len(missing)} {what} missing: {listing(missing)}"] if missing else []) + \
               ([f"{len(empty)} {what} empty (0 bytes): {listing(empty)}"] if empty else [])
    if problems:
        fail("; ".join(problems) + f". {fix}")


def stable_hash(*parts: object) -> bytes:
    """sha256 of the parts joined by ':': the same on every machine and Python version, unlike hash(),
    so seeded orders and splits are rebuilt identically."""
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
