"""Changes conlip-plugin makes to open_clip's behaviour, one module per change.

Each module has an idempotent ``apply()``; all were written for, and are applied only on,
open_clip_torch 3.3.x (``conlip_plugin.activation`` refuses other versions). This folder is
installed as ``conlip_plugin.patches``.
"""
