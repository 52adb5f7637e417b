"""A training step whose gradients are not finite is not applied: no optimizer update, no EMA, no enqueue.

Without an AMP GradScaler (``amp_bf16``, ``fp32``) one NaN or inf would be applied by the optimizer,
carried by the EMA into both momentum encoders and into the queues, and every later step would be
NaN. A pre-step hook judges on the device whether all gradients are finite and hands the flag to
torch's fused Adam / AdamW as ``found_inf`` (:func:`fuse_adam` switches open_clip_train's AdamW to
the fused kernels), so a healthy step gains no host sync. How refused steps are logged, and when
the run stops: docs/reliability.md.
"""
import glob
import logging
import os
import weakref
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)
IN_FLIGHT = 8  # publications the host lets the device owe it before it waits

# The loss terms of the newest training step (names, a device tensor of their values), recorded by the
# losses: a refused step names its non-finite terms. One training run per process, as open_clip_train has.
_last_terms: Optional[Tuple[Tuple[str, ...], torch.Tensor]] = None
_checkpoint_dir: Optional[str] = None


_guards: "weakref.WeakSet[StepGuard]" = weakref.WeakSet()


def refused_steps() -> int:
    """Optimizer steps refused so far in this process, as the host has read them (one step late)."""
    return sum(guard.refused for guard in _guards)


# Test-only: training loss calls (counted from 1) whose first term is made NaN, e.g. "5,6,7".
_POISONED = {int(n) for n in os.environ.get("CONLIP_TEST_NAN_LOSS_AT", "").split(",") if n.strip()}
_loss_calls = 0


def observe_loss_terms(losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Called by ConLIP's losses on every training step: keeps the terms (on the device, no sync) for
    the refusal message. Returns the terms (with the test switch's NaN at the named calls)."""
    global _last_terms, _loss_calls
    _loss_calls += 1
    if _loss_calls in _POISONED:
        first = next(iter(losses))
        losses = {**losses, first: losses[first] * float("nan")}
    _last_terms = (tuple(losses), torch.stack([v.detach().float() for v in losses.values()]))
    return losses


def nonfinite_weights(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """The floating tensors of a state dict that hold a NaN or an inf (one host sync for all)."""
    names = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state_dict[k]).all().cpu() for k in names]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]


def set_checkpoint_dir(path: Optional[str]) -> None:
    """Where the run's checkpoints are (open_clip_train's ``args.checkpoint_path``), for the stop message."""
    global _checkpoint_dir
    _checkpoint_dir = path


def _grads(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def fuse_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Switch torch's own Adam / AdamW to their fused kernels in place; whether the optimizer is fused.

    open_clip_train builds its AdamW with the default (foreach) kernels, which cannot skip a step
    on the device. The fused ones compute the same update (to float rounding) and take ``found_inf``.
    A resumed optimizer's step counts move to the parameters' devices, as the fused kernels keep them.
    """
    if _is_fused(optimizer) or type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return _is_fused(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(group.get("differentiable") for group in optimizer.param_groups) or any(
            p.device.type not in ("cuda", "cpu") or not p.is_floating_point() for p in params):
        return False
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=False)
    optimizer.defaults.update(fused=True, foreach=False)
    optimizer._step_supports_amp_scaling = True
    for param, state in optimizer.state.items():
        if "step" in state:
            state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
    return True


class StepGuard:
    """One model's refusal of non-finite steps; ``before_step`` / ``after_step`` run in the optimizer hooks."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.steps = 0  # optimizer steps seen
        self.refused = 0  # as the host last read it
        self._skip: Optional[torch.Tensor] = None
        self._own_found_inf = False
        self._counts: Optional[torch.Tensor] = None  # (refused so far, refused in a row), on the device
        self._in_flight: Deque[Tuple[torch.Tensor, Optional[torch.cuda.Event], int, Tuple[str, ...]]] = deque()
        self._warned_unfused = False
        _guards.add(self)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = _grads(optimizer)
        if not grads:
            self._skip = None
            return
        norms = torch._foreach_norm(grads)
        skip = (~torch.stack([n.float() for n in norms]).isfinite().all()).float()
        scaler = getattr(optimizer, "found_inf", None)  # a GradScaler's, for a fused optimizer
        if scaler is not None:
            skip = torch.maximum(skip, (scaler.to(skip.device) > 0).float())
        if fuse_adam(optimizer):
            optimizer.found_inf = skip
            self._own_found_inf = scaler is None
        elif not self._warned_unfused:
            self._warned_unfused = True
            logger.warning("ConLIP: this optimizer (%s) is not fused, so a step with non-finite gradients cannot "
                           "be skipped inside it: such steps are counted and keep the EMA and the queues, but the "
                           "optimizer applies them. Build it with fused=True.", type(optimizer).__name__)
        self._skip = skip

    def after_step(self, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
        """The step's acceptance (a device 0-d tensor, 1 applied / 0 refused), or None if unknown."""
        if self._own_found_inf:
            del optimizer.found_inf
            self._own_found_inf = False
        skip, self._skip = self._skip, None
        self.steps += 1
        self._read_published()
        if skip is None:
            return None
        if self._counts is None:
            self._counts = torch.zeros(2, device=skip.device)
        self._counts[0] += skip
        self._counts[1] = (self._counts[1] + skip) * skip
        self._publish(skip)
        if skip.device.type != "cuda":  # host memory already: nothing to wait for
            self._read_published()
        return 1.0 - skip

    def _publish(self, skip: torch.Tensor) -> None:
        """Queue this step's flag, counts and loss terms for the host, without waiting for them."""
        names, terms = _last_terms if _last_terms is not None else ((), skip.new_zeros(0))
        values = torch.cat([skip.view(1), self._counts, (~torch.isfinite(terms)).float().to(skip.device)])
        if values.device.type != "cuda":
            self._in_flight.append((values.clone(), None, self.steps, names))
            return
        if len(self._in_flight) == IN_FLIGHT:  # the GPU is that many steps behind: wait for the oldest
            self._in_flight[0][1].synchronize()
            self._read_published()
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._in_flight.append((host, event, self.steps, names))

    def _read_published(self) -> None:
        """Log the refused steps among the publications the device has finished, oldest first."""
        while self._in_flight and (self._in_flight[0][1] is None or self._in_flight[0][1].query()):
            host, _, step, names = self._in_flight.popleft()
            skip, refused, in_a_row, *bad_terms = host.tolist()
            self.refused = int(refused)
            if not skip:
                continue
            terms = ", ".join(name for name, bad in zip(names, bad_terms) if bad) or "none (a gradient overflowed)"
            logger.warning("ConLIP: optimizer step %d refused: a gradient was not finite (non-finite loss terms: "
                           "%s); no update, EMA or enqueue; %d refused so far, %d in a row", step, terms,
                           self.refused, int(in_a_row))
            if in_a_row >= self.max_in_a_row:
                raise SystemExit(stop_message(int(in_a_row), step, terms))


def stop_message(in_a_row: int, step: int, terms: str) -> str:
    from conlip_plugin.reliability.checkpoints import newest_readable

    newest = None
    if _checkpoint_dir:
        candidates = sorted(glob.glob(os.path.join(_checkpoint_dir, "*.pt")), key=os.path.getmtime, reverse=True)
        newest, _ = newest_readable(candidates)
        newest = newest and os.path.abspath(newest)
    resume = (f"resume from {newest} (--resume latest takes it)" if newest else
              "no checkpoint of this run is readable yet: restart it")
    return (f"conlip-plugin: {in_a_row} optimizer steps in a row (the last: step {step}) had non-finite gradients "
            f"(non-finite loss terms: {terms}); none was applied, and the run stops here so that no checkpoint "
            f"holds their effect. To go on, {resume}, with the cause removed. Likely causes: a learning rate too "
            f"high (lower --lr, or a longer --warmup), a precision too coarse for these losses (fp16 without a "
            f"GradScaler; try --precision amp_bf16 or fp32), a batch of bad data (the same step fails again after "
            f"the resume), or exploding gradients (--grad-clip-norm).")
