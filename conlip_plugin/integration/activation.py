"""Activation: check the open_clip version, register ConLIP's configs, apply ``patches/``.

Idempotent; called by the start-up hook after ``open_clip`` is imported, by
``python -m conlip_plugin.train``, and by users who call ``conlip_plugin.activate()``.
"""
import logging
import os
import sys
from importlib import import_module
from pathlib import Path
from typing import Dict, Tuple

from conlip_plugin.integration import patching

TESTED_OPEN_CLIP = ("3.3",)
TESTED_WEBDATASET = "0.2.5 to 0.2.86"
CONFIGS_ENV = "CONLIP_MODEL_CONFIGS"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"

OPEN_CLIP_PATCHES = ("config_paths", "preprocess_cfg", "model_class", "create_loss", "pretrained_init")
TRAIN_PATCHES = ("ddp_on_cpu", "skip_bad_samples", "atomic_checkpoints", "trim_captions", "checkpoint_on_notice",
                 "elastic_restarts")
# Bindings that more than one patch wraps, as "module.attribute" (``main`` is open_clip_train.main)
# -> the patches in the order they wrap it, innermost first. The order of the lists above must
# produce exactly these chains; ``check_chains`` verifies it after every activation.
CHAINS: Dict[str, Tuple[str, ...]] = {
    # config_paths resolves BASE+conlip names and paths; preprocess_cfg then drops the section.
    "open_clip.factory.get_model_config": ("config_paths", "preprocess_cfg"),
    # atomic_checkpoints' create_model records the name, around preprocess_cfg's merge.
    "open_clip.factory.create_model": ("preprocess_cfg", "atomic_checkpoints"),
    # pretrained_init marks the load as initialising; atomic_checkpoints explains its failures.
    "open_clip.factory.load_checkpoint": ("pretrained_init", "atomic_checkpoints"),
    # skip_bad_samples drains the skip report per batch, inside the pre-emption handling.
    "open_clip_train.train.train_one_epoch": ("skip_bad_samples", "checkpoint_on_notice"),
    # main's torch: DistributedDataParallel for CPU, then the atomic save.
    "main.torch": ("ddp_on_cpu", "atomic_checkpoints"),
}
_done: set = set()
# A named logger: the root-level logging functions would install a handler of their own at import
# time (logging.basicConfig), and every later line of open_clip_train would print twice.
_log = logging.getLogger(__name__)


class UnsupportedVersion(RuntimeError):
    """An installed library the patches were not written for; nothing of that step is applied."""


class UnsupportedOpenClipVersion(UnsupportedVersion):
    pass


class UnsupportedWebdataset(UnsupportedVersion):
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


def check_webdataset() -> None:
    """Refuse a webdataset whose decode stage is not where ``patches/skip_bad_samples.py`` looks
    (``webdataset.filters._decode``): its decode errors would be counted as lost shards."""
    import webdataset
    import webdataset.filters as filters

    from conlip_plugin.patches.skip_bad_samples import DECODE_STAGE

    stage = getattr(filters, DECODE_STAGE, None)
    if getattr(getattr(stage, "__code__", None), "co_name", None) != DECODE_STAGE:
        version = getattr(webdataset, "__version__", "unknown")
        raise UnsupportedWebdataset(
            f"conlip-plugin's skip_bad_samples patch recognises webdataset decode errors as raised in "
            f"webdataset.filters.{DECODE_STAGE}, which the installed webdataset {version} lacks; it was "
            f"tested with webdataset {TESTED_WEBDATASET}. Install a tested version "
            f"(pip install 'webdataset>=0.2.5,<=0.2.86'), or set CONLIP_PLUGIN_DISABLE=1 to use "
            f"open_clip without ConLIP."
        )


def _apply(patch_names: tuple) -> None:
    for name in patch_names:
        import_module(f"conlip_plugin.patches.{name}").apply()


def check_chains() -> None:
    """Raise if a binding in ``CHAINS`` is wrapped by other patches or in another order."""
    for target, declared in CHAINS.items():
        module_name, _, attribute = target.rpartition(".")
        if module_name == "main":
            owners = list(patching.mains())
        else:
            owners = [sys.modules[module_name]] if module_name in sys.modules else []
        for owner in owners:
            found = tuple(patching.chain(owner, attribute))
            if found and found != declared[:len(found)]:
                raise RuntimeError(
                    f"conlip-plugin: {target} is wrapped by the patches {found} in that order, but activation "
                    f"declares {declared} (CHAINS in conlip_plugin/integration/activation.py): a patch list or "
                    f"a patch's apply() changed without its chain. Make the lists and CHAINS agree; as a user, "
                    f"reinstall conlip-plugin, or set CONLIP_PLUGIN_DISABLE=1 to use open_clip without ConLIP.")


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
    except UnsupportedVersion as err:
        if strict:
            raise
        print(f"conlip-plugin: not activated: {err}", file=sys.stderr)
        return
    _done.add(step)


def activate_open_clip(strict: bool = True) -> None:
    def run():
        check_open_clip_version()
        _apply(OPEN_CLIP_PATCHES)
        check_chains()
        register_configs()
        _log.debug("conlip-plugin activated for open_clip")

    _guarded("open_clip", strict, run)


def activate_open_clip_train(strict: bool = True) -> None:
    activate_open_clip(strict)

    def run():
        check_open_clip_version()
        check_webdataset()
        _apply(TRAIN_PATCHES)
        check_chains()

    _guarded("open_clip_train", strict, run)


def deactivate() -> None:
    """Undo every patch (``patching.unapply``); a later ``activate()`` applies them afresh."""
    patching.unapply()
    _done.clear()


def activate() -> None:
    """Activate everything now, raising if the installed open_clip was not tested."""
    activate_open_clip_train(strict=True)
