"""Workers that torchrun restarts (``--max-restarts``) meet in a fresh namespace of its store.

Why: torchrun's agent keeps one TCPStore across the restarts of a group, and the keys through
which gloo ranks exchange their addresses are named alike in every attempt. A restarted rank that
comes up before its peers reads the dead attempt's addresses and fails (``Gloo connectFullMesh
failed ... Connection refused``) or hangs connecting, so a run never survives its first dead rank
(seen with torch 2.14 under both the static and the c10d rendezvous).
What: in ``open_clip_train.distributed`` only (its module global ``torch``), ``init_process_group``
with the ``env://`` method, on a restarted attempt (``TORCHELASTIC_RESTART_COUNT`` > 0), makes the
same rendezvous itself and passes the store prefixed with the attempt's number. First attempts,
SLURM runs without torchrun and explicit stores are unchanged. For: open_clip_torch 3.3.x.
"""
import functools
import os
import types
from typing import Any, Callable

import torch
import torch.distributed as dist



def fresh_namespace(init_process_group: Callable) -> Callable:
    @functools.wraps(init_process_group)
    def wrapper(backend: Any = None, init_method: Any = None, *args: Any, **kwargs: Any):
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if attempt == 0 or args or kwargs.get("store") is not None or (init_method or "env://") != "env://":
            return init_process_group(backend, init_method, *args, **kwargs)
        rank, world_size = kwargs.pop("rank", -1), kwargs.pop("world_size", -1)
        timeout = {"timeout": kwargs["timeout"]} if kwargs.get("timeout") is not None else {}
        store, rank, world_size = next(dist.rendezvous("env://", rank=rank, world_size=world_size, **timeout))
        store = dist.PrefixStore(f"conlip/attempt_{attempt}", store)
        return init_process_group(backend, store=store, rank=rank, world_size=world_size, **kwargs)

    return wrapper


class _Distributed(types.ModuleType):
    """``torch.distributed`` for one module's namespace, with ``init_process_group`` wrapped."""

    def __init__(self) -> None:
        super().__init__(dist.__name__, dist.__doc__)
        self.init_process_group = fresh_namespace(dist.init_process_group)

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)


class _Torch(types.ModuleType):
    """``torch`` for one module's namespace, whose ``distributed`` is ``_Distributed``."""

    def __init__(self) -> None:
        super().__init__(torch.__name__, torch.__doc__)
        self.distributed = _Distributed()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def apply() -> None:
    import open_clip_train.distributed as distributed

    if not isinstance(distributed.torch, _Torch):
        distributed.torch = _Torch()
