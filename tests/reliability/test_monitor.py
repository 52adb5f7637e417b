"""The health monitor: its collapse value, the once-only collapse warning, and the precision counters."""
import argparse
import logging
import math
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import image_transform
from torch import nn

import conlip_plugin
import shapes_data
from conlip_plugin.method.loss import ConLIPLoss, instance_contrastive_loss
from conlip_plugin.reliability.monitor import (
    HealthMonitor,
    MIN_WARMUP,
    collapse_loss,
    mean_pairwise_cosine,
    negatives_per_query,
    parse_health_line,
)

LOGGER = "conlip_plugin.reliability.monitor"
DIM = 16


def _collapse_warnings(records: List[logging.LogRecord]) -> List[logging.LogRecord]:
    return [r for r in records if "collapse suspected" in r.getMessage()]


def _health(records: List[logging.LogRecord]) -> List[Tuple[int, dict]]:
    """(level, parsed fields) of each health line."""
    parsed = [(r.levelno, parse_health_line(r.getMessage())) for r in records]
    return [(level, fields) for level, fields in parsed if fields is not None]


def _identical(b: int = 8) -> torch.Tensor:
    return F.normalize(torch.ones(b, DIM), dim=-1)


def _spread(b: int = 8) -> torch.Tensor:
    return F.normalize(torch.randn(b, DIM), dim=-1)


def _dropout_noisy(b: int = 8) -> torch.Tensor:
    """One point plus per-sample noise: mean pairwise cosine ~0.9, like a collapsed tower under dropout."""
    return F.normalize(_identical(b) + 0.08 * torch.randn(b, DIM), dim=-1)


class _FakeRun:
    """Feeds a monitor training steps with given loss values, each followed by a real optimizer step."""

    def __init__(self, monitor: HealthMonitor):
        self.monitor = monitor
        self.optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)

    def step(self, features: torch.Tensor, text_features: Optional[torch.Tensor] = None, **terms: float) -> None:
        losses = {name: torch.tensor(value) for name, value in terms.items()}
        self.monitor.observe(losses, losses["dcl_loss"], features,
                             features if text_features is None else text_features)
        self.optimizer.step()


# --------------------------------------------------------------------------------------------
# the collapse value
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("instance_loss", ["dcl", "infonce"])
@pytest.mark.parametrize("in_batch", [True, False], ids=["inbatch", "queueonly"])
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 3)])
def test_collapse_value_is_the_loss_of_identical_embeddings_keys_and_queue(instance_loss, in_batch, rank, world):
    torch.manual_seed(0)
    b, queue_size, tau = 4, 10, 0.05
    same = F.normalize(torch.randn(DIM, dtype=torch.float64), dim=0)
    queries, keys, queue = same.expand(b, DIM), same.expand(b * world, DIM), same.expand(queue_size, DIM)
    n = negatives_per_query(queue_size, b * world, in_batch)
    assert n == queue_size + (b * world - 1) * in_batch
    direction = instance_contrastive_loss(queries, keys, queue, torch.tensor(1 / tau, dtype=torch.float64),
                                          offset=rank * b, decoupled=instance_loss == "dcl",
                                          in_batch_negatives=in_batch)
    # n (DCL) or n + 1 (InfoNCE) equal logits: log-sum-exp minus the positive is ln of their count
    assert float(direction) == pytest.approx(math.log(n + (instance_loss == "infonce")), abs=2e-5)
    summed = ConLIPLoss(instance_loss, in_batch, rank=rank)(
        queries, queries, torch.tensor(1 / tau), keys, keys, queue, queue, output_dict=True)
    assert float(summed[f"{instance_loss}_loss"]) == pytest.approx(collapse_loss(n, instance_loss), abs=4e-5)


def test_mean_pairwise_cosine_equals_the_off_diagonal_mean():
    torch.manual_seed(1)
    features = F.normalize(torch.randn(6, DIM, dtype=torch.float64) + 0.5, dim=-1)
    gram = features @ features.t()
    off_diagonal = (gram.sum() - gram.diagonal().sum()) / (6 * 5)
    assert float(mean_pairwise_cosine(features)) == pytest.approx(float(off_diagonal), abs=1e-6)
    assert float(mean_pairwise_cosine(_identical())) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# the collapse warning, on fed values
# --------------------------------------------------------------------------------------------

def test_forced_collapse_warns_once_after_warmup_and_window_with_values_and_step(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor = HealthMonitor(negatives_per_query(64, 64, True), warmup=20, check_every=10, window=100)
    assert monitor.collapse_value == pytest.approx(2 * math.log(127))
    run = _FakeRun(monitor)
    stuck = monitor.collapse_value + 0.004
    for _ in range(300):
        run.step(_identical(), dcl_loss=stuck)
    warnings = _collapse_warnings(caplog.records)
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "at step 120:" in message  # 20 warm-up steps, then a 100-step window
    assert f"{monitor.collapse_value:.4f}" in message and f"{stuck:.4f}" in message
    assert "image 1.0000, text 1.0000" in message and "127 negatives" in message
    for advice in ("--lr", "--lock-text", "conlip_cfg.momentum", "conlip_cfg.queue_size"):
        assert advice in message


def test_collapse_under_dropout_noise_still_warns(caplog):
    """Dropout keeps a collapsed text tower's embeddings apart (mean cosine 0.90-0.96 in conlip-tiny-cl)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    torch.manual_seed(5)
    monitor = HealthMonitor(200, warmup=20, check_every=10, window=100)
    run = _FakeRun(monitor)
    text_cos = []
    for step in range(150):
        text = _dropout_noisy()
        text_cos.append(float(mean_pairwise_cosine(text)))
        run.step(_identical(), text, dcl_loss=monitor.collapse_value + 0.1 * (-1) ** step)
    assert 0.85 < statistics.fmean(text_cos) < 0.95
    assert len(_collapse_warnings(caplog.records)) == 1


Case = Callable[[int], Tuple[torch.Tensor, torch.Tensor, float]]  # step -> image, text, loss - collapse value


@pytest.mark.parametrize("case", [
    lambda step: (_spread(), _spread(), 0.0),  # the loss at the value, but the embeddings apart
    lambda step: (_identical(), _spread(), 0.0),  # one tower alike, the other apart
    lambda step: (_identical(), _identical(), -0.5),  # embeddings alike, but the positives stand out
    lambda step: (_identical(), _identical(), 0.14 - 0.0014 * step),  # near the value, falling 0.14 per 100
    lambda step: (_identical(), _identical(), 1.0 if 100 <= step < 110 else 0.0),  # 80, 10 off, 90
], ids=["spread", "one_tower", "below_margin", "falling", "interrupted"])
def test_no_warning_unless_collapsed_persistent_and_flat(case: Case, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    torch.manual_seed(2)
    monitor = HealthMonitor(200, warmup=20, check_every=10, window=100)
    run = _FakeRun(monitor)
    for step in range(200):
        image, text, offset = case(step)
        run.step(image, text, dcl_loss=monitor.collapse_value + offset)
    assert len(_health(caplog.records)) == 20
    assert _collapse_warnings(caplog.records) == []


def test_collapse_within_warmup_does_not_warn(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor = HealthMonitor(200, warmup=150, check_every=10, window=100)
    run = _FakeRun(monitor)
    for _ in range(240):
        run.step(_identical(), dcl_loss=monitor.collapse_value)
    assert _collapse_warnings(caplog.records) == []
    for _ in range(10):  # to step 250: 100 collapsed steps after warm-up
        run.step(_identical(), dcl_loss=monitor.collapse_value)
    assert len(_collapse_warnings(caplog.records)) == 1
    assert "at step 250:" in _collapse_warnings(caplog.records)[0].getMessage()


# --------------------------------------------------------------------------------------------
# a real training run of the tiny model
# --------------------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def tiny_run() -> Dict[str, object]:
    """150 AdamW steps (lr 5e-4) of a fresh conlip-tiny on the 30 shapes, with a monitor checking every 10.

    The monitor's warm-up is 10 steps, below the floor the CLI applies, so only the rule itself
    keeps a healthy start from warning.
    """
    conlip_plugin.activate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger = logging.getLogger(LOGGER)
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        torch.manual_seed(0)
        model = open_clip.create_model("conlip-tiny", pretrained_text=False, output_dict=True).train()
        cfg, batch = model.conlip_cfg, 8
        monitor = HealthMonitor(negatives_per_query(cfg.queue_size, batch, cfg.in_batch_negatives),
                                cfg.instance_loss, warmup=10, check_every=10)
        loss_fn = ConLIPLoss.from_cfg(cfg, monitor=monitor)
        pairs = shapes_data.samples(64)
        preprocess = image_transform(64, is_train=False)
        images = torch.stack([preprocess(image) for image, _ in pairs])
        ids = open_clip.get_tokenizer("conlip-tiny")([caption for _, caption in pairs])
        # fused: the same AdamW update, several times faster on CPU for the 2M-row vocabulary tables
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, fused=True)
        order = torch.Generator().manual_seed(0)
        instance, totals, image_cos, text_cos = [], [], [], []
        for _ in range(150):
            pick = torch.randperm(len(pairs), generator=order)[:batch]
            out = model(images[pick], ids[pick])
            losses = loss_fn(**out, output_dict=True)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            instance.append(float(losses["dcl_loss"].detach()))
            totals.append(float(total.detach()))
            image_cos.append(float(mean_pairwise_cosine(out["image_features"])))
            text_cos.append(float(mean_pairwise_cosine(out["text_features"])))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        torch.set_num_threads(threads)
    return {"records": handler.records, "collapse": monitor.collapse_value, "instance": instance,
            "totals": totals, "image_cos": image_cos, "text_cos": text_cos}


def test_healthy_training_run_does_not_warn_and_logs_its_counters(tiny_run):
    lines = _health(tiny_run["records"])
    assert _collapse_warnings(tiny_run["records"]) == []
    assert [fields["step"] for _, fields in lines] == list(range(10, 151, 10))
    assert all(level == logging.INFO for level, _ in lines)
    last = lines[-1][1]
    assert last["skipped"] == 0
    assert last["nonfinite"] == {"dcl_loss": 0, "conmlm_loss": 0, "conmim_loss": 0}
    assert last["max_loss"] == pytest.approx(max(tiny_run["totals"]), rel=1e-5)
    assert last["instance_loss"] == pytest.approx(statistics.fmean(tiny_run["instance"][140:]), abs=1e-3)
    assert last["collapse_at"] == pytest.approx(tiny_run["collapse"], abs=1e-4)
    assert last["samples_per_s"] > 0
    # healthy: it learned to tell the pairs apart
    assert statistics.fmean(tiny_run["instance"][140:]) < tiny_run["collapse"] - 0.5


def test_random_init_start_near_the_collapse_value_does_not_warn(tiny_run):
    """A fresh model starts where a collapsed one ends: its image embeddings nearly all alike and
    the instance loss near the collapse value. The monitor must not take that for a collapse."""
    start = slice(10, 60)
    assert min(tiny_run["image_cos"][start]) > 0.99
    assert statistics.median(abs(x - tiny_run["collapse"]) for x in tiny_run["instance"][start]) < 0.5
    lines = [fields for _, fields in _health(tiny_run["records"]) if fields["step"] <= 60]
    assert all(fields["image_cos"] > 0.99 for fields in lines)
    assert _collapse_warnings(tiny_run["records"]) == []


# --------------------------------------------------------------------------------------------
# precision counters
# --------------------------------------------------------------------------------------------

def test_nonfinite_counter_counts_injected_nan_and_inf_per_term(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor = HealthMonitor(200, check_every=5)
    run = _FakeRun(monitor)
    nan, inf = math.nan, math.inf
    steps = [(nan, 1.0, 1.0), (1.0, inf, 1.0), (nan, 1.0, -inf), (40.0, 5.0, 5.0), (2.0, 2.0, 2.0),
             (inf, 1000.0, 1.0), (1.0, 1.0, 1.0), (1.0, nan, 1.0), (3.0, 3.0, 3.0), (1.0, 1.0, 1.0)]
    steps += [(1.0, 1.0, 1.0)] * 5
    for dcl, mlm, mim in steps:
        run.step(_spread(), dcl_loss=dcl, conmlm_loss=mlm, conmim_loss=mim)
    lines = _health(caplog.records)
    assert [fields["step"] for _, fields in lines] == [5, 10, 15]
    assert lines[0][1]["nonfinite"] == {"dcl_loss": 2, "conmlm_loss": 1, "conmim_loss": 1}
    assert lines[1][1]["nonfinite"] == {"dcl_loss": 3, "conmlm_loss": 2, "conmim_loss": 1}
    assert lines[2][1]["nonfinite"] == lines[1][1]["nonfinite"]
    assert [fields["max_loss"] for _, fields in lines] == [50.0, 50.0, 50.0]  # step 6's larger total is inf
    assert [level for level, _ in lines] == [logging.WARNING, logging.WARNING, logging.INFO]
    assert all(fields["skipped"] == 0 for _, fields in lines)


def test_skipped_steps_are_loss_calls_minus_optimizer_steps(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    torch.manual_seed(3)
    monitor = HealthMonitor(negatives_per_query(16, 4, True), check_every=10)
    loss_fn = ConLIPLoss(monitor=monitor)
    head = nn.Linear(6, DIM)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    taken = []
    optimizer.register_step_post_hook(lambda *args: taken.append(1))
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    queue = F.normalize(torch.randn(16, DIM), dim=-1)
    for step in range(30):
        x = torch.randn(4, 6)
        image, text = F.normalize(head(x), dim=-1), F.normalize(head(x + 0.1 * torch.randn_like(x)), dim=-1)
        losses = loss_fn(image, text, torch.tensor(20.0), image.detach(), text.detach(), queue, queue,
                         output_dict=True)
        optimizer.zero_grad()
        scaler.scale(losses["dcl_loss"]).backward()
        if step % 5 == 1:
            continue  # no optimizer step at all
        if step % 7 == 3:
            head.weight.grad[0, 0] = math.inf  # the scaler finds it and skips the step
        before = len(taken)
        scaler.step(optimizer)
        scaler.update()
        if len(taken) > before:
            other.step()  # a second optimizer after the same loss call counts no extra step
    assert len(taken) == 30 - 6 - 4
    last = _health(caplog.records)[-1][1]
    assert last["step"] == 30 and last["skipped"] == 30 - len(taken)


# --------------------------------------------------------------------------------------------
# wiring and cost
# --------------------------------------------------------------------------------------------

def test_monitored_loss_gives_the_same_values_and_counts_only_in_train_mode(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    torch.manual_seed(4)
    image, text, keys, queue = _spread(4), _spread(4), _spread(4), _spread(12)
    inputs = (image, text, torch.tensor(20.0), keys, keys, queue, queue)
    plain = ConLIPLoss()(*inputs, output_dict=True)
    monitored = ConLIPLoss(monitor=HealthMonitor(negatives_per_query(12, 4, True), check_every=1))
    for mode in ("train", "eval", "train", "eval", "train"):
        monitored.train(mode == "train")
        out = monitored(*inputs, output_dict=True)
        assert out.keys() == plain.keys() and all(torch.equal(out[k], plain[k]) for k in plain)
    assert [fields["step"] for _, fields in _health(caplog.records)] == [1, 2]


def test_a_step_reads_no_value_back_to_the_host():
    """Meta tensors hold no values: an ``item()``, ``bool()`` or ``tolist()`` in a step would raise."""
    monitor = HealthMonitor(200, warmup=0, check_every=3)
    with torch.device("meta"):
        features = F.normalize(torch.randn(8, DIM), dim=-1)
        losses = {"dcl_loss": torch.tensor(9.0), "conmlm_loss": torch.tensor(2.0)}
    for _ in range(3):
        monitor.observe(losses, losses["dcl_loss"], features, features)
    with pytest.raises(NotImplementedError):  # the fourth call reads the accumulators, once
        monitor.observe(losses, losses["dcl_loss"], features, features)


def test_create_loss_patch_builds_a_monitor_for_rank_zero_from_args():
    from conlip_plugin.patches.create_loss import conlip_loss_for

    conlip_plugin.activate()
    model_cfg = open_clip.get_model_config("conlip-tiny-cl")
    args = argparse.Namespace(model="conlip-tiny-cl", accum_freq=1, distill=False, siglip=False, horovod=False,
                              precision="amp", rank=0, world_size=4, batch_size=8, warmup=10)
    monitor = conlip_loss_for(args, model_cfg, open_clip.create_loss).monitor
    assert monitor.negatives == 64 + 4 * 8 - 1
    assert monitor.collapse_value == pytest.approx(2 * math.log(95))
    assert monitor.warmup == MIN_WARMUP and monitor.world_size == 4
    args.warmup = 500
    assert conlip_loss_for(args, model_cfg, open_clip.create_loss).monitor.warmup == 500
    args.rank = 1
    assert conlip_loss_for(args, model_cfg, open_clip.create_loss).monitor is None
