"""ConLIP for open_clip: model configs, towers, conditioned heads, momentum queues and DCL loss.

This module stays free of heavy imports: it is imported at interpreter start-up by the
``conlip_plugin.pth`` hook, which must not pull in torch. The public pieces load on first use.
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ConLIP": "conlip_plugin.method.model",
    "ConLIPCfg": "conlip_plugin.method.config",
    "ConLIPLoss": "conlip_plugin.method.loss",
    "instance_contrastive_loss": "conlip_plugin.method.loss",
    "activate": "conlip_plugin.integration.activation",
    "export_inference_model": "conlip_plugin.integration.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'conlip_plugin' has no attribute {name!r}")
