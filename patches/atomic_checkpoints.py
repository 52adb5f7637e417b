"""Checkpoints that survive pre-emption: atomic saves, ``--resume latest`` past files cut short,
and errors that name the file and the fix.

Why: open_clip_train 3.3 saves ``epoch_N.pt`` with a plain ``torch.save``; a kill while it writes
leaves a file cut short on which ``--resume latest`` then crashes, and unreadable or wrong-model
checkpoints fail with bare tracebacks. What, in ``open_clip_train.main``'s namespace only:
``torch.save`` becomes ``atomic_save`` (write ``.partial``, fsync, rename), ``get_latest_checkpoint``
passes over files cut short, ``pt_load`` stops with the file and the way out. In
``open_clip.factory``: ``load_checkpoint`` raises ``UnreadableCheckpoint`` / ``WrongModelCheckpoint``
and ``create_model`` records the model's name for that message. For: open_clip_torch 3.3.x.
"""
import contextvars
import functools
import logging
import os
from types import ModuleType
from typing import Any, Callable, Optional

from conlip_plugin.reliability.checkpoints import (
    UnreadableCheckpoint,
    WrongModelCheckpoint,
    atomic_save,
    checkpoint_problem,
    fallback_warning,
    is_strict_mismatch,
    newest_readable,
    pretrained_error,
    resume_error,
    wrong_model_error,
)

from conlip_plugin.integration.patching import for_each_main, overlay, wrap

PATCH = __name__.rpartition(".")[2]
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


def patch_main(main: ModuleType) -> None:
    """Replace ``torch``, ``get_latest_checkpoint`` and ``pt_load`` in one ``main`` module (idempotent)."""
    if not hasattr(main, "get_latest_checkpoint"):
        return
    wrap(main, "torch", lambda real: overlay(real, {"save": atomic_save}), patch=PATCH)
    wrap(main, "get_latest_checkpoint", lambda find: _latest_readable(main, find), patch=PATCH)
    wrap(main, "pt_load", lambda load: _resume_load(main, load), patch=PATCH)


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

    for_each_main(PATCH, patch_main)
    wrap(factory, "load_checkpoint", _explained_load, patch=PATCH, also=(open_clip,))
    wrap(factory, "create_model", _named_create, patch=PATCH, also=(open_clip,))
