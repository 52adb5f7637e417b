"""Checkpoints that survive pre-emption: atomic saves, ``--resume latest`` past files cut short,
and errors that name the file and the fix.

Why: open_clip_train 3.3 saves ``epoch_N.pt`` with a plain ``torch.save``; a ``kill -9`` while it
writes leaves the file cut short, and ``--resume latest`` (``get_latest_checkpoint``: the newest
``*.pt`` by name) then crashes in ``pt_load`` with "PytorchStreamReader failed reading zip archive",
so the run stays down until a person deletes the file. An unreadable ``--resume FILE`` or
``--pretrained FILE`` fails with the same kind of traceback, and a checkpoint of another model
with torch's list of mismatched keys.

What, in ``open_clip_train.main``'s namespace (``main()`` reads these globals at each use):
- ``torch`` becomes ``TorchWithAtomicSave``: torch itself except ``save``, which writes
  ``epoch_N.partial`` (the same bytes), fsyncs it and renames it over ``epoch_N.pt``, so a kill
  leaves no ``epoch_N.pt`` or a complete one. This reaches open_clip's own save calls without
  forking them and without changing ``torch.save`` for the rest of the process (a global
  ``torch.save`` patch would also change every user's and library's saves).
- ``get_latest_checkpoint`` passes over files cut short (files of older versions or other tools),
  resuming from the newest readable one with a warning naming both; it still runs on rank 0
  only, whose choice open_clip broadcasts. Remote (``--remote-sync``) listings are unchanged.
- ``pt_load`` (the resume load): when it fails on a file that is missing, cut short or not a
  checkpoint, the run stops with that file, the problem and the way out (the newest readable
  checkpoint beside it, or ``--resume latest``) instead of a zip-archive traceback.
``open_clip_train.main`` runs as ``__main__`` under ``python -m``, so its namespace exists only
once its code has run: the names are replaced when ``main()`` calls ``parse_args`` (wrapped
here in ``open_clip_train.params``, which ``main`` imports from), and at ``apply()`` for a
``main`` module already imported.
In ``open_clip.factory`` (``create_model`` calls ``load_checkpoint`` through its module global):
``load_checkpoint`` turns a failure on an unreadable file into ``UnreadableCheckpoint`` and a
strict mismatch into ``WrongModelCheckpoint`` naming the model being created and, from the
run's ``params.txt``, the model the checkpoint was trained as; ``create_model`` only records the
model's name for that message. Successful loads are unchanged, and saves write the same bytes.
The completeness check reads the zip archive's directory (or a safetensors header), nothing more.
For: open_clip_torch 3.3.x.
"""
import contextvars
import functools
import logging
import os
import sys
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

from conlip_plugin.reliability.checkpoints import (
    TorchWithAtomicSave,
    UnreadableCheckpoint,
    WrongModelCheckpoint,
    checkpoint_problem,
    fallback_warning,
    is_strict_mismatch,
    newest_readable,
    pretrained_error,
    resume_error,
    wrong_model_error,
)

MAIN = "open_clip_train.main"
_MARK = "_conlip_checkpoint_files"
_creating: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("conlip_creating_model", default=None)


def _is_remote(path: str) -> bool:
    return "://" in path


def _newest_first(main: ModuleType, pattern: str) -> list:
    return sorted(main.glob.glob(pattern, recursive=True), key=main.natural_key, reverse=True)


def _latest_readable(main: ModuleType, find: Callable) -> Callable:
    @functools.wraps(find)
    def get_latest_checkpoint(path: str, remote: bool):
        latest = find(path, remote)
        if remote or latest is None or checkpoint_problem(latest) is None:
            return latest
        # The candidates open_clip's own function lists (its glob, its natural order), newest first.
        chosen, skipped = newest_readable(_newest_first(main, path + "**/*.pt"))
        logging.warning(fallback_warning(chosen, skipped))
        return chosen

    return get_latest_checkpoint


def _resume_load(main: ModuleType, load: Callable) -> Callable:
    @functools.wraps(load)
    def pt_load(file_path: str, map_location: Any = None):
        try:
            return load(file_path, map_location=map_location)
        except Exception:
            problem = None if _is_remote(file_path) else checkpoint_problem(file_path)
            if problem is None:
                raise
            folder = os.path.dirname(os.path.abspath(file_path))
            others = [p for p in _newest_first(main, os.path.join(folder, "*.pt"))
                      if os.path.abspath(p) != os.path.abspath(file_path)]
            readable, _ = newest_readable(others)
            raise SystemExit(resume_error(file_path, problem, readable)) from None

    return pt_load


def _mains() -> Iterator[ModuleType]:
    """``open_clip_train.main`` as imported, and as ``__main__`` under ``python -m``."""
    imported = sys.modules.get(MAIN)
    if imported is not None:
        yield imported
    entry = sys.modules.get("__main__")
    if entry is not None and entry is not imported and getattr(getattr(entry, "__spec__", None), "name", None) == MAIN:
        yield entry


def patch_main(main: ModuleType) -> None:
    """Replace ``torch``, ``get_latest_checkpoint`` and ``pt_load`` in one ``main`` module (idempotent)."""
    if getattr(main, _MARK, False) or not hasattr(main, "get_latest_checkpoint"):
        return
    main.torch = TorchWithAtomicSave()
    main.get_latest_checkpoint = _latest_readable(main, main.get_latest_checkpoint)
    main.pt_load = _resume_load(main, main.pt_load)
    setattr(main, _MARK, True)


def _patch_mains() -> None:
    for main in _mains():
        patch_main(main)


def _explained_load(load: Callable) -> Callable:
    @functools.wraps(load)
    def load_checkpoint(model, checkpoint_path, *args, **kwargs):
        try:
            return load(model, checkpoint_path, *args, **kwargs)
        except Exception as err:
            path = str(checkpoint_path)
            if is_strict_mismatch(err):
                name = _creating.get() or type(model).__name__
                raise WrongModelCheckpoint(wrong_model_error(path, name, err)) from None
            problem = None if _is_remote(path) else checkpoint_problem(path)
            if problem is None:
                raise
            raise UnreadableCheckpoint(pretrained_error(path, problem)) from None

    setattr(load_checkpoint, _MARK, True)
    return load_checkpoint


def _named_create(create: Callable) -> Callable:
    @functools.wraps(create)
    def create_model(*args, **kwargs):
        token = _creating.set(args[0] if args else kwargs.get("model_name"))
        try:
            return create(*args, **kwargs)
        finally:
            _creating.reset(token)

    return create_model


def apply() -> None:
    import open_clip
    import open_clip.factory as factory
    import open_clip_train.params as params

    if getattr(factory.load_checkpoint, _MARK, False):
        return
    parse = params.parse_args

    @functools.wraps(parse)
    def parse_args(*args, **kwargs):
        _patch_mains()
        return parse(*args, **kwargs)

    params.parse_args = parse_args
    _patch_mains()
    factory.load_checkpoint = open_clip.load_checkpoint = _explained_load(factory.load_checkpoint)
    factory.create_model = open_clip.create_model = _named_create(factory.create_model)
