"""A step whose loss or gradients are not finite is not applied (fp32, CPU bf16 autocast): weights,
optimizer state, momentum encoders, queues and pointers stay as they were; the next healthy step
trains; several in a row stop the run; no checkpoint with non-finite weights is written."""
import math
import sys

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss

import conlip_plugin
from conlip_plugin.reliability.checkpoints import refuse_nonfinite_checkpoint
from conlip_plugin.method.loss import ConLIPLoss, RecipeWithTokenLosses

PY = sys.executable
CAPTIONS = ["a red square", "two blue bars", "a green circle on white", "a yellow star"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(model, optimizer) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for i, s in enumerate(optimizer.state.values()):
        state.update({f"opt{i}.{k}": v.detach().clone() for k, v in s.items()})
    return state


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _changed(a: dict, b: dict) -> set:
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.fixture(autouse=True)
def activated():
    conlip_plugin.activate()


def _setup(name: str):
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained_text=False, output_dict=True).train()
    cfg = model.conlip_cfg
    loss = ConLIPLoss.from_cfg(cfg) if cfg.momentum_queues else RecipeWithTokenLosses.from_cfg(ClipLoss(), cfg)
    # open_clip_train's optimizer, as main builds it: AdamW with the default (not fused) kernels.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    tokens = open_clip.get_tokenizer(name)(CAPTIONS)
    return model, loss, optimizer, tokens


def _step(model, loss, optimizer, tokens, poison: bool, autocast: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(torch.randn(len(CAPTIONS), 3, 64, 64), tokens)
        if poison:  # a NaN reaches the instance term, and through it every gradient
            out["image_features"] = out["image_features"] * float("nan")
        terms = loss(**out, output_dict=True)
    sum(terms.values()).backward()
    optimizer.step()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["conlip-tiny", "conlip-tiny-clip+conmlm-conmim"])
def test_a_nan_step_changes_nothing_and_the_next_step_trains(name, autocast):
    model, loss, optimizer, tokens = _setup(name)
    _step(model, loss, optimizer, tokens, poison=False, autocast=autocast)
    before = _snapshot(model, optimizer)
    _step(model, loss, optimizer, tokens, poison=True, autocast=autocast)
    _assert_same(_snapshot(model, optimizer), before)
    assert model.step_guard.refused == 1 and optimizer.defaults["fused"]
    _step(model, loss, optimizer, tokens, poison=False, autocast=autocast)
    after = _snapshot(model, optimizer)
    changed = _changed(before, after)
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("opt") for k in changed)
    if model.conlip_cfg.momentum_queues:
        assert {"image_queue.ptr", "text_queue.ptr"} <= changed
        assert any(k.startswith("momentum_visual.") for k in changed)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_the_refused_step_is_named_with_its_terms_and_several_in_a_row_stop(caplog):
    model, loss, optimizer, tokens = _setup("conlip-tiny")
    model.step_guard.max_in_a_row = 2
    _step(model, loss, optimizer, tokens, poison=False, autocast=False)
    with caplog.at_level("WARNING"):
        _step(model, loss, optimizer, tokens, poison=True, autocast=False)
    assert "optimizer step 2 refused" in caplog.text and "dcl_loss" in caplog.text
    _step(model, loss, optimizer, tokens, poison=False, autocast=False)  # a healthy step ends the run of them
    _step(model, loss, optimizer, tokens, poison=True, autocast=False)
    with pytest.raises(SystemExit, match=r"2 optimizer steps in a row \(the last: step 5\).*Likely causes"):
        _step(model, loss, optimizer, tokens, poison=True, autocast=False)


def test_a_checkpoint_with_nonfinite_weights_is_not_written(tmp_path):
    model = open_clip.create_model("conlip-tiny", pretrained_text=False)
    state = model.state_dict()
    refuse_nonfinite_checkpoint({"state_dict": state}, str(tmp_path / "epoch_1.pt"))  # finite: passes
    state["visual.trunk.cls_token"] = state["visual.trunk.cls_token"] * math.inf
    with pytest.raises(SystemExit, match="not writing .*epoch_1.pt: 1 of its weight tensors hold NaN or inf"):
        refuse_nonfinite_checkpoint({"state_dict": state}, str(tmp_path / "epoch_1.pt"))
    plain = {"state_dict": {"w": torch.tensor([math.nan])}}  # another model's checkpoint: not ConLIP's to judge
    refuse_nonfinite_checkpoint(plain, str(tmp_path / "other.pt"))


def _cli(caption_data, tmp_path, *extra, env=None):
    import subprocess

    cmd = [PY, "-m", "open_clip_train.main", "--model", "conlip-tiny", "--train-data", str(caption_data["csv"]),
           "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key",
           "title", "--batch-size", "10", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--device", "cpu",
           "--workers", "1", "--seed", "0", "--log-every-n-steps", "1", "--name", "nan", *extra]
    import os

    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


@pytest.mark.slow
def test_cli_run_refuses_a_poisoned_step_and_stops_after_three(caption_data, tmp_path):
    """Real open_clip_train runs: one NaN step is refused and the run finishes with finite weights;
    three in a row in epoch 2 stop it, naming epoch 1's checkpoint; lr 1e6 writes no poisoned checkpoint."""
    one = tmp_path / "one"
    one.mkdir()
    proc = _cli(caption_data, one, "--epochs", "2", env={"CONLIP_TEST_NAN_LOSS_AT": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (one / "logs" / "nan" / "out.log").read_text()
    assert "optimizer step 2 refused" in log and "dcl_loss" in log
    state = torch.load(one / "logs" / "nan" / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())

    three = tmp_path / "three"
    three.mkdir()
    proc = _cli(caption_data, three, "--epochs", "2", env={"CONLIP_TEST_NAN_LOSS_AT": "4,5,6"})  # 3 steps an epoch
    assert proc.returncode != 0
    ckpt = three / "logs" / "nan" / "checkpoints" / "epoch_1.pt"
    assert "3 optimizer steps in a row" in proc.stderr and f"resume from {ckpt}" in proc.stderr
    assert not (three / "logs" / "nan" / "checkpoints" / "epoch_2.pt").exists()

    wild = tmp_path / "wild"
    wild.mkdir()
    proc = _cli(caption_data, wild, "--epochs", "2", "--lr", "1e6")
    checkpoints = list((wild / "logs" / "nan" / "checkpoints").glob("*.pt"))
    for path in checkpoints:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    assert proc.returncode != 0 and "conlip-plugin:" in proc.stderr
