"""Changes conlip-plugin makes to open_clip's behaviour, one module per change.

The change files live in the repository's top-level ``patches/`` folder. A wheel copies them into
this package; in a checkout (an editable install) this package reads them from that folder, so
``conlip_plugin.patches.NAME`` is the same file either way. Each module's ``apply()`` changes
open_clip once, through ``conlip_plugin.integration.patching``; all were written for, and are
applied only on, open_clip_torch 3.3.x (``conlip_plugin.integration.activation`` refuses others).
"""
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "patches").is_dir():
    __path__.append(str(_CHECKOUT / "patches"))
