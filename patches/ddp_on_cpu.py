"""Let open_clip_train run DDP on CPU (gloo), e.g. ``torchrun --nproc_per_node 2`` without GPUs.

Why: open_clip_train 3.3's ``main`` wraps the model as ``DistributedDataParallel(model,
device_ids=[device])`` even when the device is the CPU, and torch refuses ``device_ids`` for
CPU modules, so every multi-process CPU run crashes at start. What: replaces
``torch.nn.parallel.DistributedDataParallel`` (once ``open_clip_train`` is imported) with a
subclass that drops ``device_ids`` / ``output_device`` when they name the CPU, which is what
torch requires there; GPU calls are unchanged. For: open_clip_torch 3.3.x.
"""
import torch
from torch.nn.parallel import DistributedDataParallel


def _is_cpu(devices) -> bool:
    return bool(devices) and all(torch.device(d).type == "cpu" for d in devices)


class CpuTolerantDDP(DistributedDataParallel):
    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if device_ids is not None and _is_cpu(device_ids):
            device_ids = None
            output_device = None
        super().__init__(module, device_ids, output_device, *args, **kwargs)


def apply() -> None:
    if not issubclass(torch.nn.parallel.DistributedDataParallel, CpuTolerantDDP):
        torch.nn.parallel.DistributedDataParallel = CpuTolerantDDP
