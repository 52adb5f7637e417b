"""Let open_clip_train run DDP on CPU (gloo), e.g. ``torchrun --nproc_per_node 2`` without GPUs.

Why: open_clip_train 3.3's ``main`` wraps the model as ``DistributedDataParallel(model,
device_ids=[device])`` even on the CPU, where torch refuses ``device_ids``, so every
multi-process CPU run crashes at start. What: in ``open_clip_train.main`` only (its module
global ``torch``), ``torch.nn.parallel.DistributedDataParallel`` is a subclass that drops
``device_ids`` / ``output_device`` when they name the CPU; torch itself and GPU calls are
unchanged. For: open_clip_torch 3.3.x.
"""
from types import ModuleType

import torch
from torch.nn.parallel import DistributedDataParallel

from conlip_plugin.integration.patching import for_each_main, overlay, wrap

PATCH = __name__.rpartition(".")[2]


def _is_cpu(devices) -> bool:
    return bool(devices) and all(torch.device(d).type == "cpu" for d in devices)


class CpuTolerantDDP(DistributedDataParallel):
    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if device_ids is not None and _is_cpu(device_ids):
            device_ids = None
            output_device = None
        super().__init__(module, device_ids, output_device, *args, **kwargs)


def patch_main(main: ModuleType) -> None:
    """Give one ``main`` module a ``torch`` whose ``nn.parallel.DistributedDataParallel`` is ours."""
    if not hasattr(main, "torch"):
        return
    wrap(main, "torch", lambda real: overlay(real, {"nn.parallel.DistributedDataParallel": CpuTolerantDDP}),
         patch=PATCH)


def apply() -> None:
    for_each_main(PATCH, patch_main)
