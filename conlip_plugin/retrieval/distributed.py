"""The ranks of a multi-process ``index`` run (``torchrun``, or ``srun`` under SLURM), set up by
open_clip_train's own environment handling, so that the variables and backends are the training's.

Ranks share the chunks round-robin (chunk n is rank n mod world's), each embedding its own on its own
device; after a barrier rank 0 alone assembles the files and builds the approximate index.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` ranks (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def from_environment(device: Optional[str]) -> Tuple[Ranks, Optional[str]]:
    """Ranks and this rank's device, where torchrun or SLURM started several processes (the device's
    index becomes the local rank, as in open_clip_train; gloo on the CPU); otherwise one rank, the
    device as asked."""
    from open_clip_train.distributed import init_distributed_device_so, is_using_distributed

    from conlip_plugin.retrieval.encoder import default_device

    if not is_using_distributed():
        return Ranks(), device
    placed = init_distributed_device_so(device=device or default_device())
    return Ranks(placed["global_rank"], placed["world_size"]), placed["device"]
