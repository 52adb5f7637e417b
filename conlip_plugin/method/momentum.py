"""Momentum encoders (EMA copies, Eq. 8) and the feature queues they fill."""
import copy
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module``: updated only by :func:`ema_update_`, never by the optimizer."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update_(momentum_params: List[torch.Tensor], online_params: List[torch.Tensor], m: float,
                accept: Optional[torch.Tensor] = None) -> None:
    """theta_bar <- m * theta_bar + (1 - m) * theta, in fp32, as one fused foreach op; with ``accept``
    (a device 0-d tensor, 1 or 0) the step is weighed by it, so a refused step moves nothing, unsynced."""
    if any(p.dtype != torch.float32 for p in momentum_params):
        raise TypeError("momentum parameters must be fp32 (the EMA is kept in full precision)")
    online = [p.detach().float() for p in online_params]
    torch._foreach_lerp_(momentum_params, online, 1.0 - m if accept is None else (1.0 - m) * accept)


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """All ranks' keys, in rank order (no gradient); the keys themselves outside a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    out = keys.new_empty((dist.get_world_size() * keys.shape[0],) + tuple(keys.shape[1:]))
    dist.all_gather_into_tensor(out, keys.contiguous())
    return out


class FeatureQueue(nn.Module):
    """K unit-norm fp32 keys and a write pointer; writes wrap around.

    It starts from random unit vectors (as ALBEF does), drawn from the global RNG, which
    open_clip seeds identically on every rank before building the model. Writes are of the
    all-gathered global batch, so every rank holds the same contents without DDP broadcasts.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, accept: Optional[torch.Tensor] = None) -> None:
        """Write ``keys`` at the pointer; with ``accept`` (a device 0-d tensor) 0, write nothing (no sync)."""
        size, total = self.features.shape[0], keys.shape[0]
        keys = keys.detach().to(self.features.dtype)[-size:]
        start = self.ptr + (total - keys.shape[0])
        idx = (start + torch.arange(keys.shape[0], device=keys.device)) % size
        advance = total
        if accept is not None:
            keys = torch.where(accept > 0, keys, self.features[idx])
            advance = total * (accept > 0).long()
        self.features.index_copy_(0, idx, keys)
        self.ptr.copy_((self.ptr + advance) % size)
