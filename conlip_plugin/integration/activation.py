"""Activation: check the open_clip version, register ConLIP's configs, apply ``patches/``.

Idempotent; called by the start-up hook after ``open_clip`` is imported, by
``python -m conlip_plugin.train``, and by users who call ``conlip_plugin.activate()``.
"""
import logging
import os
import sys
from importlib import import_module
from pathlib import Path

TESTED_OPEN_CLIP = ("3.3",)
CONFIGS_ENV = "CONLIP_MODEL_CONFIGS"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"

_OPEN_CLIP_PATCHES = ("config_paths", "preprocess_cfg", "model_class", "create_loss", "pretrained_init")
_TRAIN_PATCHES = ("ddp_on_cpu", "skip_bad_samples", "atomic_checkpoints", "trim_captions", "checkpoint_on_notice", "elastic_restarts")
_done: set = set()
# A named logger: the root-level logging functions would install a handler of their own at import
# time (logging.basicConfig), and every later line of open_clip_train would print twice.
_log = logging.getLogger(__name__)


class UnsupportedOpenClipVersion(RuntimeError):
    pass


def check_open_clip_version() -> None:
    import open_clip

    version = getattr(open_clip, "__version__", "unknown")
    if not any(version == v or version.startswith(v + ".") for v in TESTED_OPEN_CLIP):
        raise UnsupportedOpenClipVersion(
            f"conlip-plugin was tested with open_clip_torch {', '.join(v + '.x' for v in TESTED_OPEN_CLIP)} "
            f"and found {version}: its patches change open_clip internals that differ between versions. "
            f"Install a tested version (pip install 'open_clip_torch>=3.3,<3.4'), or set "
            f"CONLIP_PLUGIN_DISABLE=1 to use open_clip without ConLIP."
        )


def _apply(patch_names: tuple) -> None:
    for name in patch_names:
        import_module(f"conlip_plugin.patches.{name}").apply()


def register_configs() -> None:
    """Register the bundled configs and every folder or file named in ``CONLIP_MODEL_CONFIGS``."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    for entry in filter(None, os.environ.get(CONFIGS_ENV, "").split(os.pathsep)):
        path = Path(entry).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{CONFIGS_ENV} names {path}, which does not exist: point it at a folder of "
                f"open_clip JSON model configs (or a single JSON file), separated by '{os.pathsep}'."
            )
        open_clip.add_model_config(path)


def _guarded(step: str, strict: bool, fn) -> None:
    if step in _done:
        return
    try:
        fn()
    except UnsupportedOpenClipVersion as err:
        if strict:
            raise
        print(f"conlip-plugin: not activated: {err}", file=sys.stderr)
        return
    _done.add(step)


def activate_open_clip(strict: bool = True) -> None:
    def run():
        check_open_clip_version()
        _apply(_OPEN_CLIP_PATCHES)
        register_configs()
        _log.debug("conlip-plugin activated for open_clip")

    _guarded("open_clip", strict, run)


def activate_open_clip_train(strict: bool = True) -> None:
    activate_open_clip(strict)

    def run():
        check_open_clip_version()
        _apply(_TRAIN_PATCHES)

    _guarded("open_clip_train", strict, run)


def activate() -> None:
    """Activate everything now, raising if the installed open_clip was not tested."""
    activate_open_clip_train(strict=True)
