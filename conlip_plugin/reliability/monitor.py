"""Training health of a ConLIP run: a collapse warning and precision counters, read rarely.

A run can collapse (every embedding the same, the instance loss stuck at its collapse value) or
lose steps to fp16 overflow, and neither shows in open_clip's log. :class:`HealthMonitor` only adds
to small tensors on the device each step and reads them once every ``check_every`` steps, so a
step gains no host sync. The health line (:func:`parse_health_line`), the collapse rule and the
runs its thresholds come from: docs/reliability.md, "Training health".
"""
import logging
import math
import re
import time
import weakref
from collections import deque
from typing import Deque, Dict, Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from conlip_plugin.reliability.finite_steps import refused_steps

logger = logging.getLogger(__name__)

MARGIN = 0.15
MIN_COS = 0.8
MIN_SHARE = 0.9
FALL_TOLERANCE = 0.05
MIN_WARMUP = 100

HEALTH_LINE = re.compile(
    r"ConLIP health: step (?P<step>\d+) skipped (?P<skipped>\d+) nonfinite (?P<nonfinite>(?:\S+=\d+ )*)"
    r"max_loss (?P<max_loss>\S+) instance_loss (?P<instance_loss>\S+) collapse_at (?P<collapse_at>\S+) "
    r"embed_cos image=(?P<image_cos>\S+) text=(?P<text_cos>\S+) samples/s (?P<samples_per_s>\S+)"
)


def parse_health_line(line: str) -> Optional[dict]:
    """The fields of a health line in ``line`` (ints, floats, ``nonfinite`` as {term: count}), or None."""
    match = HEALTH_LINE.search(line)
    if match is None:
        return None
    fields = match.groupdict()
    out = {key: float(value) for key, value in fields.items() if key not in ("step", "skipped", "nonfinite")}
    out["step"], out["skipped"] = int(fields["step"]), int(fields["skipped"])
    pairs = (item.split("=") for item in fields["nonfinite"].split())
    out["nonfinite"] = {name: int(count) for name, count in pairs}
    return out


def negatives_per_query(queue_size: int, global_batch: int, in_batch_negatives: bool) -> int:
    """Negatives each query is scored against: the queue, plus the other keys of the global batch."""
    return queue_size + (global_batch - 1 if in_batch_negatives else 0)


def collapse_loss(negatives: int, instance_loss: str = "dcl") -> float:
    """The summed two-direction instance loss when every embedding, key and queue entry is the same.

    Every logit is then 1/tau, so each direction's DCL is ln(n); InfoNCE keeps the positive: ln(n + 1).
    """
    return 2.0 * math.log(negatives + (instance_loss == "infonce"))


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine between different rows of unit vectors (B, D): (B |m|^2 - 1) / (B - 1), m the mean row.

    O(B D) instead of a B x B matrix; 1 when all rows are the same, 0 for a single row.
    """
    b = features.shape[0]
    mean = features.detach().float().mean(0)
    return (b * (mean * mean).sum() - 1) / max(b - 1, 1)


class HealthMonitor:
    """Counts a run's steps, skipped steps, non-finite loss terms and largest loss; warns once on collapse.

    ``negatives``: per query (:func:`negatives_per_query`); ``warmup``: steps before collapse is
    judged; ``world_size``: ranks, for the global samples/s. The optimizer hook counts a step of any
    optimizer that follows a loss call, once per call: the run is expected to own the process.
    """

    def __init__(
            self,
            negatives: int,
            instance_loss: str = "dcl",
            warmup: int = MIN_WARMUP,
            check_every: int = 50,
            window: int = 100,
            world_size: int = 1,
    ):
        self.negatives = negatives
        self.collapse_value = collapse_loss(negatives, instance_loss)
        self.warmup, self.check_every, self.window, self.world_size = warmup, check_every, window, world_size
        self._calls = self._steps = self._read_at = 0
        self._pending = False
        self._warned = False
        self._names: Optional[Tuple[str, ...]] = None
        self._nonfinite: Optional[torch.Tensor] = None  # per term, cumulative
        self._max_loss: Optional[torch.Tensor] = None  # cumulative
        self._interval: Optional[torch.Tensor] = None  # loss sum, finite count, image cos, text cos, collapsed
        self._after_warmup = self._samples = 0  # since the last read
        self._clock = 0.0
        self._seen_skipped = self._seen_nonfinite = 0
        self._streak: Deque[Tuple[int, float]] = deque()  # (steps after warm-up, mean loss) per interval
        self._hook_optimizer_steps()

    def _hook_optimizer_steps(self) -> None:
        monitor_ref = weakref.ref(self)

        def after_optimizer_step(optimizer, args, kwargs) -> None:
            monitor = monitor_ref()
            if monitor is not None:
                monitor._count_step()

        handle = register_optimizer_step_post_hook(after_optimizer_step)
        weakref.finalize(self, handle.remove)

    def _count_step(self) -> None:
        if self._pending:
            self._steps += 1
            self._pending = False
            self._maybe_read()

    def observe(
            self,
            losses: Dict[str, torch.Tensor],
            instance: torch.Tensor,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
    ) -> None:
        """Add one training step: its loss terms, the instance term, the normalised online embeddings."""
        self._maybe_read()
        with torch.no_grad():
            values = torch.stack([v.detach().float() for v in losses.values()])
            if self._names is None:
                self._start(tuple(losses), values.device)
            elif tuple(losses) != self._names:
                raise ValueError(f"loss terms changed from {self._names} to {tuple(losses)}")
            finite = torch.isfinite(values)
            self._nonfinite += ~finite
            total = torch.where(finite.all(), values.sum(), float("-inf"))
            torch.maximum(self._max_loss, total, out=self._max_loss)
            instance = instance.detach().float()
            finite_instance = torch.isfinite(instance)
            cos = torch.stack([mean_pairwise_cosine(image_features), mean_pairwise_cosine(text_features)])
            after_warmup = self._calls >= self.warmup
            collapsed = ((instance - self.collapse_value).abs() <= MARGIN) & (cos.min() >= MIN_COS)
            self._interval += torch.stack([
                torch.where(finite_instance, instance, 0.0), finite_instance.float(), cos[0], cos[1],
                collapsed.float() * after_warmup,
            ])
        self._calls += 1
        self._after_warmup += after_warmup
        self._samples += image_features.shape[0] * self.world_size
        self._pending = True

    def _start(self, names: Tuple[str, ...], device: torch.device) -> None:
        self._names = names
        self._nonfinite = torch.zeros(len(names), dtype=torch.long, device=device)
        self._max_loss = torch.full((), float("-inf"), device=device)
        self._interval = torch.zeros(5, device=device)
        self._clock = time.perf_counter()

    def _maybe_read(self) -> None:
        if self._calls - self._read_at >= self.check_every:
            self._read()

    def _read(self) -> None:
        """The one host sync per interval: log the health line, judge collapse, start a new interval."""
        values = torch.cat([self._interval, self._max_loss.view(1), self._nonfinite.float()]).tolist()
        loss_sum, loss_count, image_cos, text_cos, collapsed = values[:5]
        max_loss, nonfinite = values[5], [int(v) for v in values[6:]]
        steps = self._calls - self._read_at
        now = time.perf_counter()
        mean_loss = loss_sum / loss_count if loss_count else math.nan
        image_cos, text_cos = image_cos / steps, text_cos / steps
        skipped = self._calls - self._steps + refused_steps()
        new_trouble = skipped > self._seen_skipped or sum(nonfinite) > self._seen_nonfinite
        counts = " ".join(f"{name}={count}" for name, count in zip(self._names, nonfinite))
        logger.log(
            logging.WARNING if new_trouble else logging.INFO,
            f"ConLIP health: step {self._calls} skipped {skipped} nonfinite {counts} max_loss {max_loss:.6g} "
            f"instance_loss {mean_loss:.4f} collapse_at {self.collapse_value:.4f} "
            f"embed_cos image={image_cos:.4f} text={text_cos:.4f} samples/s {self._samples / (now - self._clock):.1f}",
        )
        self._judge_collapse(collapsed, mean_loss, image_cos, text_cos)
        self._seen_skipped, self._seen_nonfinite = skipped, sum(nonfinite)
        self._interval.zero_()
        self._after_warmup = self._samples = 0
        self._clock, self._read_at = now, self._calls

    def _judge_collapse(self, collapsed: float, mean_loss: float, image_cos: float, text_cos: float) -> None:
        if self._warned:
            return
        if self._after_warmup == 0 or collapsed < MIN_SHARE * self._after_warmup:
            self._streak.clear()
            return
        self._streak.append((self._after_warmup, mean_loss))
        while sum(steps for steps, _ in self._streak) - self._streak[0][0] >= self.window:
            self._streak.popleft()
        covered = sum(steps for steps, _ in self._streak)
        oldest_loss = self._streak[0][1]
        if covered < self.window or mean_loss < oldest_loss - FALL_TOLERANCE:
            return
        self._warned = True
        logger.warning(
            f"ConLIP collapse suspected at step {self._calls}: for the last {covered} steps the instance loss "
            f"stayed within {MARGIN} of its collapse value {self.collapse_value:.4f} (every embedding the same, "
            f"every logit 1/tau; {self.negatives} negatives per query) and is not falling "
            f"({oldest_loss:.4f} -> {mean_loss:.4f}); mean pairwise cosine of the online embeddings: "
            f"image {image_cos:.4f}, text {text_cos:.4f} (1 = identical). The model is at chance. "
            f"Likely causes: a learning rate too high (lower --lr); an unlocked pretrained tower "
            f"(--lock-text, or a lower --lr); momentum encoders and queues too stale for a run this short "
            f"(lower conlip_cfg.momentum or conlip_cfg.queue_size). Reported once; training goes on."
        )
