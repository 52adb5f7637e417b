"""clip-retrieval's own ``clip_client`` module, imported without its package's ``__init__``.

The tests check ``conlip-retrieval serve`` against clip-retrieval's real ``ClipClient``, not a copy of it.
clip-retrieval is installed with ``--no-deps`` (its declared dependencies pin numpy<2, pyarrow<16 and
open-clip<3), and its package ``__init__`` imports its whole back end (flask, and more that is not
installed), while ``clip_client`` itself needs only ``requests``. So the package is registered here as a
bare module whose ``__path__`` is the installed package folder, and ``clip_retrieval.clip_client`` is then
imported from that folder in the ordinary way, unchanged.
"""
import importlib
import importlib.util
import sys
import types
from types import ModuleType

import pytest


def clip_client() -> ModuleType:
    """The installed ``clip_retrieval.clip_client``; the calling test is skipped when clip-retrieval is absent."""
    if "clip_retrieval" not in sys.modules:
        spec = importlib.util.find_spec("clip_retrieval")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("clip-retrieval is not installed: pip install --no-deps clip-retrieval==2.45.0")
        package = types.ModuleType("clip_retrieval")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["clip_retrieval"] = package
    return importlib.import_module("clip_retrieval.clip_client")
