"""A pre-emption notice (SIGTERM or SIGUSR1, as SLURM's ``--signal`` and cloud schedulers send)
ends a training run with a checkpoint, then an exit status for the scheduler to requeue.

Why: open_clip_train 3.3 installs no handler: the signal kills the run, and everything since the
last epoch's checkpoint is lost.
What: wraps ``open_clip_train.train.train_one_epoch`` (which ``open_clip_train.main`` imports by
name after this patch is applied; a ``main`` already imported gets it too) in
``conlip_plugin.reliability.preemption.run_epoch``: the handler records the signal, the ranks agree before each
optimizer step (one step late, on a CPU group), rank 0 saves open_clip's own checkpoint dict, and
every rank exits with status 75. Any model trained through open_clip_train gets it;
``CONLIP_PREEMPTION_SIGNALS=none`` keeps the signals' default actions. For: open_clip_torch 3.3.x.
"""
import functools
from typing import Callable

from conlip_plugin.integration.patching import for_each_main, wrap

PATCH = __name__.rpartition(".")[2]


def _on_notice(original: Callable) -> Callable:
    from conlip_plugin.reliability.preemption import run_epoch

    @functools.wraps(original)
    def train_one_epoch(*args, **kwargs):
        return run_epoch(original, *args, **kwargs)

    return train_one_epoch


def _rebind(main) -> None:
    import open_clip_train.train as train

    wrap(train, "train_one_epoch", _on_notice, patch=PATCH, also=(main,))


def apply() -> None:
    import open_clip_train.train as train

    from conlip_plugin.reliability.preemption import notice_signals

    notice_signals()  # a malformed CONLIP_PREEMPTION_SIGNALS stops the run before it starts
    wrap(train, "train_one_epoch", _on_notice, patch=PATCH)
    for_each_main(PATCH, _rebind)
