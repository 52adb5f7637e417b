"""Checkpoint files that survive a kill: atomic saves, a cheap completeness check, clear errors.

open_clip_train 3.3 writes ``epoch_N.pt`` with a plain ``torch.save``: a ``kill -9`` while it
writes leaves the file cut short, and ``--resume latest`` then picks that file by name and dies in
``torch.load`` with "PytorchStreamReader failed reading zip archive". The pieces here are plain
functions; ``patches/atomic_checkpoints.py`` wires them into open_clip.

The completeness check reads no tensor and unpickles nothing: ``torch.save`` writes a zip archive
whose directory comes last, so a file cut short at any point lacks it, and checking for it costs a
few kilobytes of reading even for a checkpoint of many gigabytes.
"""
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

import torch

from conlip_plugin.atomic_files import atomic_path

PARTIAL_SUFFIX = ".partial"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # the legacy (torch < 1.6) torch.save format: a bare pickle stream
_STRICT_MISMATCH = "Error(s) in loading state_dict for"
_MODEL_LINE = re.compile(r"^model:\s*(\S+)\s*$", re.MULTILINE)
CHECKPOINT_KINDS = ("an epoch_N.pt written by open_clip_train, an open_clip weights file (.safetensors, .bin, "
                    ".pt) or a pretrained tag (open_clip.list_pretrained())")


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is missing, cut short, or not a checkpoint at all."""


class WrongModelCheckpoint(RuntimeError):
    """A readable checkpoint whose weights belong to another model (a strict load mismatch)."""


def partial_path(path: str) -> str:
    """Where ``atomic_save`` writes ``path`` first (``epoch_2.pt`` -> ``epoch_2.partial``): not
    ``*.pt``, so open_clip's ``--resume latest`` glob never picks it up, and of the same stem, which
    torch.save names the archive's records after, so the file renamed into place holds exactly the
    bytes that ``torch.save(obj, path)`` writes."""
    folder, name = os.path.split(path)
    return os.path.join(folder, os.path.splitext(name)[0] + PARTIAL_SUFFIX)


def refuse_nonfinite_checkpoint(obj: Any, path: str) -> None:
    """Stop the run rather than write a ConLIP checkpoint (one with ConLIP's extra state) whose
    weights hold NaN or inf: it would replace, or with ``--delete-previous-checkpoint`` delete, a good one."""
    from conlip_plugin.reliability.finite_steps import nonfinite_weights

    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(k.endswith("_extra_state") for k in state):
        return
    bad = nonfinite_weights(state)
    if bad:
        raise SystemExit(
            f"conlip-plugin: not writing {path}: {len(bad)} of its weight tensors hold NaN or inf (first: "
            f"{', '.join(bad[:3])}), so the run stops and the checkpoints before it stay as they are. Resume from "
            f"the newest of them (--resume latest) with the cause removed: most often a learning rate too high "
            f"(lower --lr, a longer --warmup, --grad-clip-norm).")


def atomic_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    """``torch.save`` whose target path holds either its previous content or the complete new file.

    A path is written as ``partial_path(path)``, fsynced, then renamed over ``path`` (a rename
    within one folder is atomic); a kill at any moment leaves at most the partial file, which the
    next save of the same path overwrites. The fsyncs keep a crash of the machine from making the
    rename durable before the data (a complete-looking name over an empty file). File objects and
    buffers go to ``torch.save`` unchanged.
    """
    if not isinstance(f, (str, os.PathLike)):
        torch.save(obj, f, *args, **kwargs)
        return
    path = os.fspath(f)
    refuse_nonfinite_checkpoint(obj, path)
    with atomic_path(path, temporary=partial_path(path)) as partial:
        torch.save(obj, os.fspath(partial), *args, **kwargs)


def _safetensors_problem(path: Path) -> Optional[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            return None
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        return f"is not a readable safetensors file ({err})"


def checkpoint_problem(path: Any) -> Optional[str]:
    """Why ``path`` cannot be a complete checkpoint, as a phrase that follows "it"; ``None`` when it
    looks complete. Checks the file's structure only: it unpickles nothing and reads no tensor."""
    p = Path(path)
    if not p.exists():
        return "does not exist"
    if not p.is_file():
        return "is not a file"
    size = p.stat().st_size
    if size == 0:
        return "is empty (0 bytes): it was cut short while being written, or copied incompletely"
    if p.suffix == ".safetensors":
        return _safetensors_problem(p)
    with open(p, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_PICKLE_PROTO):
        return None
    if not head.startswith(_ZIP_MAGIC) and not _ZIP_MAGIC.startswith(head):
        return f"is not a torch checkpoint: torch.save writes a zip archive, and this file begins {head!r}"
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return (f"is cut short ({size} bytes): it begins like a torch checkpoint (a zip archive) but lacks the "
                f"archive's end, which torch.save writes last: its run was killed while writing it, or it was "
                f"copied incompletely")
    if p.suffix != ".npz" and not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "is a zip archive but not a torch checkpoint (it has no data.pkl record)"
    return None


def newest_readable(candidates_newest_first: Iterable[str]) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The first complete checkpoint of the candidates, and ``(path, problem)`` for each one
    skipped before it."""
    skipped = []
    for path in candidates_newest_first:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def fallback_warning(chosen: Optional[str], skipped: List[Tuple[str, str]]) -> str:
    """The warning of ``--resume latest`` when it passes over files that are cut short."""
    passed = "; and ".join(f"{path}, which {problem}" for path, problem in skipped)
    if chosen is None:
        return (f"conlip-plugin: --resume latest skips {passed}. No readable checkpoint is left: training starts "
                f"from the beginning, and overwrites each unreadable file when it saves that epoch.")
    return (f"conlip-plugin: --resume latest skips {passed}. Resuming from {chosen}, the newest readable "
            f"checkpoint, instead; the run overwrites the unreadable file when it saves that epoch again.")


def resume_error(path: str, problem: str, readable: Optional[str]) -> str:
    """The error of a ``--resume FILE`` that cannot be read, with the way out."""
    if readable is not None:
        fix = (f"Resume from a readable checkpoint instead: --resume {readable} (the newest readable one beside "
               f"it), or --resume latest, which passes over files that are cut short")
    else:
        fix = "Give --resume a complete checkpoint, or drop --resume to start afresh"
    return f"conlip-plugin: cannot resume from {path}: it {problem}. {fix}."


def pretrained_error(path: str, problem: str) -> str:
    """The error of pretrained weights (``--pretrained FILE``) that cannot be read."""
    return (f"conlip-plugin: cannot load pretrained weights from {path}: it {problem}. Give --pretrained "
            f"(pretrained=) {CHECKPOINT_KINDS}; for a file cut short, use an older epoch_N.pt of the same run.")


def trained_model(path: str) -> Optional[Tuple[str, Path]]:
    """The ``--model`` that the run which wrote ``path`` used, read from the ``params.txt`` that
    open_clip_train writes beside the ``checkpoints/`` folder (or beside the file), and that file."""
    folder = Path(path).resolve().parent
    for params in (folder.parent / "params.txt", folder / "params.txt"):
        if params.is_file():
            found = _MODEL_LINE.search(params.read_text(errors="replace"))
            if found:
                return found.group(1), params
    return None


def _strict_details(err: Exception, limit: int = 240) -> str:
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return "; ".join(line if len(line) <= limit else line[:limit] + " ..." for line in lines[:3])


def is_strict_mismatch(err: BaseException) -> bool:
    """Whether ``err`` is torch's strict ``load_state_dict`` refusal (keys or shapes differ)."""
    return isinstance(err, RuntimeError) and str(err).startswith(_STRICT_MISMATCH)


def wrong_model_error(path: str, model_name: str, err: Exception) -> str:
    """The error of a checkpoint of another model: names both models when the run's params.txt
    is at hand, and says which to create."""
    origin = trained_model(path)
    if origin is not None:
        name, params = origin
        fix = (f"{params} says it was trained with --model {name}: create that model (--model {name}), or give "
               f"a checkpoint of {model_name!r}")
    else:
        fix = (f"Create the model it was trained with (its run's params.txt, beside the checkpoints/ folder, "
               f"names it on the 'model:' line), or give a checkpoint of {model_name!r}")
    return (f"conlip-plugin: model {model_name!r} cannot load {path}: the file holds the weights of a different "
            f"model ({_strict_details(err)}). {fix}.")

