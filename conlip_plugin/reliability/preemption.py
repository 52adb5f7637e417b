"""A pre-emption notice (SIGTERM, SIGUSR1) ends a training run with a checkpoint to resume from.

SLURM (``--signal``) and cloud schedulers send a signal some seconds before they kill a job;
open_clip_train dies of it, and everything since the last epoch's checkpoint is lost. The handler
only records the signal; the ranks agree on it before a later step (one all-reduced integer, read a
step late, so a healthy step waits for no device work), rank 0 writes open_clip_train's own
checkpoint of the last applied step, and every rank exits with ``PREEMPTED_EXIT`` for the
scheduler to requeue. What a resume from it means: docs/reliability.md.
"""
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from conlip_plugin.reliability.checkpoints import atomic_save, checkpoint_problem
from conlip_plugin.integration.loaders import torch_data_loader

logger = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, to be tried again
SIGNALS_ENV = "CONLIP_PREEMPTION_SIGNALS"
DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"
PREEMPTED_NAME = re.compile(r"^epoch_(\d+)_preempted\.pt$")


class Preempted(Exception):
    """Raised in the optimizer's pre-step hook once every rank knows of a notice."""


def notice_signals(spec: Optional[str] = None) -> List[signal.Signals]:
    """The signals named in ``CONLIP_PREEMPTION_SIGNALS`` (default SIGTERM and SIGUSR1; empty: none)."""
    spec = os.environ.get(SIGNALS_ENV, DEFAULT_SIGNALS) if spec is None else spec
    names = [name.strip().upper() for name in spec.split(",") if name.strip()]
    if names in (["NONE"], ["OFF"]):
        return []
    unknown = [name for name in names if not isinstance(getattr(signal, name, None), signal.Signals)]
    if unknown:
        raise ValueError(f"{SIGNALS_ENV}={spec!r} names {', '.join(unknown)}, which are not signals here: give a "
                         f"comma-separated list such as {DEFAULT_SIGNALS}, or 'none' to keep the default actions")
    return [getattr(signal, name) for name in names]


def checkpoint_files(checkpoint_dir: str, epoch: int, resume_epoch: int, save_most_recent: bool) -> List[str]:
    """Where the stop's checkpoint goes. At an epoch's end (``resume_epoch`` = ``epoch`` + 1): the
    ``epoch_N.pt`` open_clip would write. Mid-epoch: ``epoch_E_preempted.pt``, which open_clip's
    natural order puts after ``epoch_E.pt`` and before ``epoch_{E+1}.pt``, so ``--resume latest``
    takes it only while it is the newest. With ``--save-most-recent`` also ``epoch_latest.pt``, which
    ``--resume latest`` then reads instead."""
    name = f"epoch_{resume_epoch}.pt" if resume_epoch > epoch else f"epoch_{epoch}_preempted.pt"
    paths = [os.path.join(checkpoint_dir, name)]
    if save_most_recent:
        paths.append(os.path.join(checkpoint_dir, "epoch_latest.pt"))
    return paths


def remove_superseded(checkpoint_dir: str) -> List[str]:
    """Delete ``epoch_E_preempted.pt`` files that a readable ``epoch_N.pt`` with N > E supersedes."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    epochs = [int(p.stem.split("_")[1]) for p in folder.glob("epoch_*.pt")
              if re.fullmatch(r"epoch_\d+", p.stem) and checkpoint_problem(p) is None]
    newest = max(epochs, default=-1)
    removed = []
    for path in folder.iterdir():
        found = PREEMPTED_NAME.match(path.name)
        if found and int(found.group(1)) < newest:
            path.unlink()
            removed.append(str(path))
    return removed


def open_clip_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, epoch: int,
                         name: str) -> Dict[str, Any]:
    """The dict open_clip_train saves at an epoch's end (the model as ``main`` holds it, DDP included)."""
    held = getattr(model, "_orig_mod", model)  # torch.compile wraps the module main saves
    state = {"epoch": epoch, "name": name, "state_dict": held.state_dict(), "optimizer": optimizer.state_dict()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def _exit_when_parent_signals(signals: List[signal.Signals], parent: int) -> None:
    """A loader worker's wait for the notices: a scheduler's are ignored; one from the training
    process (its shutdown of the loader) ends the worker quietly, as torch's own worker handler does."""
    while True:
        if signal.sigwaitinfo(signals).si_pid == parent:
            os._exit(0)


class IgnoringNotices:
    """A DataLoader ``worker_init_fn``: the loader's own, after the worker is set to outlive the
    notices. torchrun and SLURM signal a worker's whole process group; a loader worker that died of
    it would make the training process raise mid-stop, before its checkpoint is written."""

    def __init__(self, signals: List[signal.Signals], inner: Optional[Callable[[int], None]]):
        self.signals = signals
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)  # threads started later inherit the mask
        threading.Thread(target=_exit_when_parent_signals, args=(self.signals, os.getppid()), daemon=True).start()
        if self.inner is not None:
            self.inner(worker_id)


def shield_workers(loader, signals: List[signal.Signals]) -> None:
    """Make the loader's workers (those it starts from now on) ignore the notices."""
    torch_loader = torch_data_loader(loader)
    if not isinstance(torch_loader.worker_init_fn, IgnoringNotices):
        torch_loader.worker_init_fn = IgnoringNotices(signals, torch_loader.worker_init_fn)


class PreemptionWatch:
    """Records notices and lets all ranks agree, one step late, to stop before the same step."""

    def __init__(self, device: Optional[torch.device], signals: List[signal.Signals]):
        self.device = device  # the default process group's device; None on one process
        self.signals = signals
        self.received: Optional[str] = None
        self.step_in_epoch = 0
        self._pending: Optional[tuple] = None

    def install(self) -> None:
        for sig in self.signals:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self.received = self.received or signal.Signals(signum).name

    def _send(self) -> None:
        """All-reduce (max) this rank's flag, without waiting: a fill, not a host copy, on a GPU."""
        flag = torch.full((1,), int(self.received is not None), dtype=torch.int32, device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type != "cuda":
            self._pending = (work, flag, None)
            return
        work.wait()  # orders the current stream after the all-reduce; the host goes on
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (None, host, event)

    def _receive(self) -> bool:
        work, value, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # recorded a step ago: the device is almost always past it
        else:
            work.wait()
        return bool(value.item())

    def agreed(self) -> bool:
        """Whether every rank has been told to stop: the answer of the previous call's all-reduce
        (or, on one process, whether a signal came); a new all-reduce goes out when it is no."""
        if self.device is None:
            return self.received is not None
        if self._pending is not None and self._receive():
            return True
        self._send()
        return False

    def settle(self) -> bool:
        """At an epoch's end: the answer still owed, so the next epoch starts with none in flight."""
        if self.device is None:
            return self.received is not None
        return self._pending is not None and self._receive()

    def before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.agreed():
            raise Preempted
        self.step_in_epoch += 1

    def barrier(self) -> None:
        if self.device is not None:
            dist.barrier()


_watch: Optional[PreemptionWatch] = None


def _watch_for(args: Any) -> Optional[PreemptionWatch]:
    """The process's watch, made at the first epoch; None where notices are not honoured."""
    global _watch
    if _watch is None:
        signals = notice_signals()
        if not signals or getattr(args, "horovod", False) or threading.current_thread() is not threading.main_thread():
            return None
        device = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device(args.device) if dist.get_backend() == "nccl" else torch.device("cpu")
        _watch = PreemptionWatch(device, signals)
        _watch.install()
    return _watch


def _stop(watch: PreemptionWatch, checkpoint: Callable[[int], Dict[str, Any]], args: Any, epoch: int,
          resume_epoch: int, steps_per_epoch: int) -> None:
    """Rank 0 writes the checkpoint; every rank waits for it, then exits with ``PREEMPTED_EXIT``."""
    step = epoch * steps_per_epoch + watch.step_in_epoch
    if getattr(args, "save_logs", False):
        state = checkpoint(resume_epoch)
        paths = checkpoint_files(args.checkpoint_path, epoch, resume_epoch, bool(getattr(args, "save_most_recent", 0)))
        for path in paths:
            atomic_save(state, path)
        where = f"wrote {' and '.join(paths)} (the state before that step); --resume latest continues"
        if resume_epoch == epoch:
            where += (f" by starting epoch {epoch} again from its first batch: the {watch.step_in_epoch} steps of "
                      f"it done before the notice stay in the weights, and this epoch's learning-rate schedule and "
                      f"data run again from their start")
    else:
        where = "no checkpoint written: the run saves none (--logs none)"
    watch.barrier()
    if getattr(args, "rank", 0) == 0:
        logger.warning("ConLIP: pre-emption notice (%s): stopped before step %d of the schedule (epoch %d, batch %d); "
                       "%s. Exiting with status %d for the scheduler to requeue.", watch.received or "another rank's",
                       step + 1, epoch, watch.step_in_epoch + 1, where, PREEMPTED_EXIT)
    raise SystemExit(PREEMPTED_EXIT)


def run_epoch(train_one_epoch: Callable, model, data, loss, epoch: int, optimizer, scaler, scheduler, dist_model,
              args, tb_writer=None) -> None:
    """open_clip_train's ``train_one_epoch``, stopping with a checkpoint on a pre-emption notice."""
    watch = _watch_for(args)
    if watch is None:
        return train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                               tb_writer=tb_writer)
    if getattr(args, "save_logs", False):
        for path in remove_superseded(args.checkpoint_path):
            logger.info("ConLIP: removed %s, which a newer epoch checkpoint supersedes", path)
    shield_workers(data["train"].dataloader, watch.signals)
    steps_per_epoch = data["train"].dataloader.num_batches // max(1, getattr(args, "accum_freq", 1))
    watch.step_in_epoch = 0
    hook = optimizer.register_step_pre_hook(watch.before_step)

    def checkpoint(resume_epoch: int) -> Dict[str, Any]:
        return open_clip_checkpoint(model, optimizer, scaler, resume_epoch, args.name)

    try:
        train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer)
    except Preempted:
        _stop(watch, checkpoint, args, epoch, epoch, steps_per_epoch)
    finally:
        hook.remove()
    if watch.settle():
        _stop(watch, checkpoint, args, epoch, epoch + 1, steps_per_epoch)
