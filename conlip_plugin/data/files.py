"""Small helpers the data tools share: required input files, captions, stable hashes."""
import hashlib
from pathlib import Path
from typing import Iterable

from conlip_plugin.command_errors import fail, listing


def normalize_caption(raw: object) -> str:
    """Collapse all whitespace (newlines included) to single spaces; None is the empty caption.

    Flickr's annotation file and the CSV are line based, and stray whitespace is only noise to a tokenizer.
    """
    return " ".join(str(raw).split()) if raw is not None else ""


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
