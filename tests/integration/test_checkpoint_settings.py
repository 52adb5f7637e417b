"""Checkpoints of other ConLIP settings: a continued run is refused naming both, a new run starts
from what fits and says what starts fresh; the queues survive a change of world size."""
import json
import logging
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from conlip_plugin.integration.activation import CONFIG_DIR

PY = sys.executable


def _tiny(name: str, **changes) -> dict:
    cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (cfg[section] if section else cfg)[field] = value
    return cfg


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("settings_configs")
    variants = {
        "cktest-queue32": _tiny("conlip-tiny", **{"conlip_cfg.queue_size": 32}),
        "cktest-momentum": _tiny("conlip-tiny", **{"conlip_cfg.momentum": 0.5}),
        "cktest-embed32": _tiny("conlip-tiny", embed_dim=32, **{"vision_cfg.timm_proj": "linear",
                                                                "text_cfg.hf_proj_type": "linear"}),
    }
    for name, cfg in variants.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    return root


def _model(name: str, seed: int):
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained_text=False)


def _checkpoint(model, path: Path) -> Path:
    torch.save({"epoch": 1, "name": "run", "state_dict": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("saved,loading,says", [
    ("conlip-tiny", "cktest-queue32", "conlip_cfg.queue_size 64 in the checkpoint, 32 here"),
    ("conlip-tiny-vanilla", "conlip-tiny", "conlip_cfg.variant 'vanilla' in the checkpoint, 'conlip' here"),
    ("conlip-tiny-cl", "conlip-tiny", "conlip_cfg.variant 'cl' in the checkpoint, 'conlip' here"),
    ("conlip-tiny", "conlip-tiny-cl", "conlip_cfg.variant 'conlip' in the checkpoint, 'cl' here"),
])
def test_continuing_a_run_under_other_settings_is_refused(configs, saved, loading, says):
    state = _model(saved, 0).state_dict()
    with pytest.raises(ValueError, match=f"{says}.*resume with the config it was trained with.*--pretrained"):
        _model(loading, 1).load_state_dict(state)


def test_another_embedding_size_is_refused_either_way(configs, tmp_path):
    path = _checkpoint(_model("conlip-tiny", 0), tmp_path / "epoch_1.pt")
    with pytest.raises(ValueError, match="embed into 64 dimensions, this model's into 32"):
        _model("cktest-embed32", 1).load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    with pytest.raises(ValueError, match="embed into 64 dimensions"):
        open_clip.create_model("cktest-embed32", pretrained=str(path))


def test_checkpoints_from_before_settings_were_recorded_still_load_and_are_checked(configs):
    state = {k: v for k, v in _model("conlip-tiny", 0).state_dict().items() if k != "_extra_state"}
    model = _model("conlip-tiny", 1)
    model.load_state_dict(state)
    assert torch.equal(model.image_queue.features, state["image_queue.features"])
    with pytest.raises(ValueError, match="other shape: image_queue, text_queue"):
        _model("cktest-queue32", 1).load_state_dict(state)


def test_other_hyperparameters_continue_and_are_named(configs, caplog):
    state = _model("conlip-tiny", 0).state_dict()
    with caplog.at_level(logging.WARNING):
        _model("cktest-momentum", 1).load_state_dict(state)
    assert "momentum 0.99 -> 0.5" in caplog.text


def test_a_cl_checkpoint_starts_a_conlip_run_with_fresh_heads(configs, tmp_path, caplog):
    cl = _model("conlip-tiny-cl", 0)
    path = _checkpoint(cl, tmp_path / "cl.pt")
    with caplog.at_level(logging.WARNING):
        model = open_clip.create_model("conlip-tiny", pretrained=str(path))
    assert "conlip_cfg.variant 'cl' in the checkpoint, 'conlip' here" in caplog.text
    assert "started fresh: image_mask_token, mim_head, mim_predictor, mlm_head, mlm_predictor" in caplog.text
    for key, value in cl.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.get_extra_state()["conlip_cfg"]["variant"] == "conlip"


def test_a_conlip_checkpoint_starts_a_cl_run_without_its_heads(configs, tmp_path, caplog):
    conlip = _model("conlip-tiny", 0)
    path = _checkpoint(conlip, tmp_path / "conlip.pt")
    with caplog.at_level(logging.WARNING):
        model = open_clip.create_model("conlip-tiny-cl", pretrained=str(path))
    assert "not used: image_mask_token, mim_head, mim_predictor, mlm_head, mlm_predictor" in caplog.text
    assert torch.equal(model.momentum_text.transformer.embeddings.word_embeddings.weight,
                       conlip.momentum_text.transformer.embeddings.word_embeddings.weight)
    assert torch.equal(model.text_queue.features, conlip.text_queue.features)


def test_another_queue_size_starts_fresh_queues_from_pretrained(configs, tmp_path, caplog):
    conlip = _model("conlip-tiny", 0)
    path = _checkpoint(conlip, tmp_path / "conlip.pt")
    fresh = _model("cktest-queue32", 5)
    torch.manual_seed(5)
    with caplog.at_level(logging.WARNING):
        model = open_clip.create_model("cktest-queue32", pretrained=str(path), pretrained_text=False)
    assert "started fresh: image_queue, text_queue" in caplog.text
    assert torch.equal(model.image_queue.features, fresh.image_queue.features) and int(model.image_queue.ptr) == 0
    assert torch.equal(model.visual.trunk.pos_embed, conlip.visual.trunk.pos_embed)


@pytest.mark.slow
def test_resuming_under_another_model_config_stops_with_the_reason(caption_data, tmp_path, run):
    import subprocess

    base = ["--train-data", str(caption_data["csv"]), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "10", "--lr", "5e-4",
            "--precision", "fp32", "--device", "cpu", "--workers", "1", "--name", "run"]
    run([PY, "-m", "open_clip_train.main", "--model", "conlip-tiny-cl", "--epochs", "1", *base], tmp_path)
    proc = subprocess.run([PY, "-m", "open_clip_train.main", "--model", "conlip-tiny", "--epochs", "2",
                           "--resume", "latest", *base], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "conlip_cfg.variant 'cl' in the checkpoint, 'conlip' here" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_queues_stay_global_when_the_world_size_changes_on_resume(caption_data, tmp_path, run):
    """Two gloo ranks train epoch 1 (1 step of a global batch of 16 keys), one process resumes for
    epoch 2 (3 steps of 8): the pointer continues, and every row the resumed steps did not write is
    the checkpoint's. (open_clip 3.3 saves DDP runs with 'module.' keys and strips them for a single
    process; the other direction does not load in open_clip itself: start such a run with --pretrained.)"""
    script = (Path(__file__).resolve().parents[1] / "helpers" / "dump_queues_main.py")
    args = ["--model", "conlip-tiny", "--train-data", str(caption_data["csv"]), "--dataset-type", "csv",
            "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "8",
            "--lr", "5e-4", "--precision", "fp32", "--device", "cpu", "--workers", "1", "--name", "ws", "--seed", "0"]
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    run([*torchrun, str(script), *args, "--epochs", "1"], tmp_path)
    q0, q1 = (torch.load(tmp_path / f"queues_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert int(q0["ptr"]) == int(q1["ptr"]) == 16
    assert torch.equal(q0["image"], q1["image"]) and torch.equal(q0["text"], q1["text"])
    saved = torch.load(tmp_path / "logs" / "ws" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    before = saved["module.image_queue.features"]
    assert torch.equal(before, q0["image"])
    run([PY, str(script), *args, "--epochs", "2", "--resume", "latest"], tmp_path)
    after = torch.load(tmp_path / "queues_rank0.pt", weights_only=True)
    assert int(after["ptr"]) == 16 + 24
    assert torch.equal(after["image"][:16], before[:16]) and torch.equal(after["image"][40:], before[40:])
    assert not torch.equal(after["image"][16:40], before[16:40])
