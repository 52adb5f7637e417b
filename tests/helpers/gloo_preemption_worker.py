"""One rank of the 2-process gloo test of the pre-emption watch (tests/reliability/test_cluster_faults.py), in a
module of its own so that spawned processes import it by name."""
import os

import torch
import torch.distributed as dist

from conlip_plugin.reliability import preemption


def agree(rank: int, port: int, noticed_at: int, results) -> None:
    """Rank ``rank`` of 2: the step before which the watch stops; rank 1 alone gets the notice."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    watch = preemption.PreemptionWatch(torch.device("cpu"), [])
    stopped = None
    for step in range(10):
        if rank == 1 and step == noticed_at:
            watch.received = "SIGTERM"
        try:
            watch.before_step(None, (), {})
        except preemption.Preempted:
            stopped = step
            break
    results[rank] = (stopped, watch.settle() if stopped is None else None)
    dist.destroy_process_group()
