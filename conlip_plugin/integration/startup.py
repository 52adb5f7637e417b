"""Start-up hook (run from ``conlip_plugin.pth``): activate the plugin when open_clip is imported.

Importing torch at interpreter start-up would slow every Python process, so this only installs
an import hook; the plugin itself loads right after ``open_clip`` (or ``open_clip_train``) has
finished importing, and ``open_clip_train.main``'s names once it is imported.
``CONLIP_PLUGIN_DISABLE=1`` turns the hook off.
"""
import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

DISABLE_ENV = "CONLIP_PLUGIN_DISABLE"
MAIN = "open_clip_train.main"  # imported (not run with -m): its names are patched once it has run


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _after_import(name: str) -> None:
    from conlip_plugin.integration import activation

    if name == "open_clip":
        activation.activate_open_clip(strict=False)
    elif name == "open_clip_train":
        activation.activate_open_clip_train(strict=False)
    elif name == MAIN:
        from conlip_plugin.integration.patching import patch_mains

        patch_mains()  # the names patches change in main; no-op unless they were applied


class _LoaderThenActivate(importlib.abc.Loader):
    """Delegates to the real loader, then activates the plugin for that module."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(self._loader, attr)

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _after_import(self._name)


class _ActivateAfterImport(importlib.abc.MetaPathFinder):
    targets = ("open_clip", "open_clip_train", MAIN)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.targets:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderThenActivate(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    if _disabled() or any(isinstance(f, _ActivateAfterImport) for f in sys.meta_path):
        return
    for name in _ActivateAfterImport.targets:
        if name in sys.modules:
            _after_import(name)
    sys.meta_path.insert(0, _ActivateAfterImport())


install()
