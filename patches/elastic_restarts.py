"""Workers that torchrun restarts (``--max-restarts``) meet in a fresh namespace of its store.

Why: torchrun's agent keeps one TCPStore across the restarts of a group, and the keys through
which gloo ranks exchange their addresses are named alike in every attempt. A restarted rank that
comes up before its peers reads the dead attempt's addresses and fails (``Gloo connectFullMesh
failed ... Connection refused``) or hangs connecting, so a run never survives its first dead rank.
What: in ``open_clip_train.distributed`` only (its module global ``torch``), ``init_process_group``
with the ``env://`` method, on a restarted attempt (``TORCHELASTIC_RESTART_COUNT`` > 0), makes the
same rendezvous itself and passes the store prefixed with the attempt's number. First attempts,
SLURM runs without torchrun and explicit stores are unchanged. For: open_clip_torch 3.3.x.
"""
import functools
import os
from typing import Any, Callable

import torch.distributed as dist

from conlip_plugin.integration.patching import overlay, wrap


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


def apply() -> None:
    import open_clip_train.distributed as distributed

    wrap(distributed, "torch",
         lambda real: overlay(real, {"distributed.init_process_group": fresh_namespace(dist.init_process_group)}),
         patch=__name__.rpartition(".")[2])
