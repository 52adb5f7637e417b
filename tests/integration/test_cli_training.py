"""End to end through the unmodified open_clip_train CLI, in subprocesses, on CPU."""
import re
import sys
from pathlib import Path

import pytest
import torch

PYTHON = sys.executable

TERMS = ("Dcl_loss", "Conmlm_loss", "Conmim_loss")
BATCH, QUEUE = 8, 64

pytestmark = pytest.mark.slow


def train_args(data: dict, kind: str, name: str, epochs: int, model: str = "conlip-tiny") -> list:
    args = ["--model", model, "--batch-size", str(BATCH), "--epochs", str(epochs), "--lr", "5e-4",
            "--warmup", "2", "--precision", "fp32", "--device", "cpu", "--seed", "0", "--name", name,
            "--log-every-n-steps", "1", "--save-frequency", "1", "--workers", "1"]
    if kind == "csv":
        args += ["--train-data", str(data["csv"]), "--dataset-type", "csv", "--csv-separator", ",",
                 "--csv-img-key", "filepath", "--csv-caption-key", "title"]
    else:
        args += ["--train-data", str(data["shard"]), "--dataset-type", "webdataset",
                 "--train-num-samples", str(data["count"])]
    return args


def logged_terms(log: str) -> dict:
    """Every 'Name: value (avg)' pair of the training log lines, in order, per name."""
    found = {}
    for line in log.splitlines():
        if "Train Epoch" in line:
            for key, val in re.findall(r"(\w+): ([-\d.e+]+) \(", line):
                found.setdefault(key, []).append(float(val))
    return found


@pytest.fixture(scope="module")
def csv_run(caption_data, tmp_path_factory, run):
    """Two epochs of conlip-tiny on the CSV; 30 rows, batch 8, drop_last: 3 steps an epoch."""
    cwd = tmp_path_factory.mktemp("csv_run")
    run([PYTHON, "-m", "open_clip_train.main", *train_args(caption_data, "csv", "run", 2)], cwd)
    return cwd / "logs" / "run"


def test_csv_run_logs_every_term_and_checkpoints_training_state(csv_run):
    terms = logged_terms((csv_run / "out.log").read_text())
    for term in TERMS:
        assert len(terms.get(term, [])) == 6, f"{term} missing from the log: {sorted(terms)}"
    ckpt = torch.load(csv_run / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    # 2 epochs x 3 steps x 8 keys were enqueued once per optimizer step.
    assert int(sd["image_queue.ptr"]) == int(sd["text_queue.ptr"]) == (2 * 3 * BATCH) % QUEUE
    norms = sd["image_queue.features"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    online, momentum = sd["visual.trunk.blocks.0.mlp.fc1.weight"], sd["momentum_visual.trunk.blocks.0.mlp.fc1.weight"]
    assert not torch.equal(online, momentum), "momentum encoder should lag the online encoder"


def test_resume_latest_continues_with_identical_state(csv_run, caption_data, run):
    cwd = csv_run.parent.parent
    saved = torch.load(csv_run / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=True)["state_dict"]
    proc_args = train_args(caption_data, "csv", "run", 3) + ["--resume", "latest"]
    run([PYTHON, "-m", "open_clip_train.main", *proc_args], cwd)
    log = (csv_run / "out.log").read_text()
    assert "resuming checkpoint" in log and "(epoch 2)" in log
    resumed = torch.load(csv_run / "checkpoints" / "epoch_3.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert int(resumed["image_queue.ptr"]) == (3 * 3 * BATCH) % QUEUE
    # Epoch 3 wrote 24 keys from the saved pointer 48, wrapping: rows 48..63 and 0..7 are new,
    # rows 8..47 are exactly what was saved.
    before, after = saved["image_queue.features"], resumed["image_queue.features"]
    assert torch.equal(after[BATCH:48], before[BATCH:48])
    assert not torch.equal(after[48:], before[48:]) and not torch.equal(after[:BATCH], before[:BATCH])


def test_webdataset_two_epochs(caption_data, tmp_path, run):
    run([PYTHON, "-m", "open_clip_train.main", *train_args(caption_data, "wds", "wds", 2)], tmp_path)
    run_dir = tmp_path / "logs" / "wds"
    terms = logged_terms((run_dir / "out.log").read_text())
    assert all(terms.get(t) for t in TERMS), sorted(terms)
    assert (run_dir / "checkpoints" / "epoch_2.pt").is_file()


@pytest.mark.parametrize("model,expected,absent", [
    ("conlip-tiny-vanilla", ("Dcl_loss", "Mlm_loss", "Mim_loss"), ("Conmlm_loss",)),
    ("conlip-tiny-cl", ("Dcl_loss",), ("Conmlm_loss", "Mlm_loss", "Conmim_loss", "Mim_loss")),
])
def test_baselines_log_their_own_terms(caption_data, tmp_path, model, expected, absent, run):
    run([PYTHON, "-m", "open_clip_train.main", *train_args(caption_data, "csv", "b", 1, model)], tmp_path)
    terms = logged_terms((tmp_path / "logs" / "b" / "out.log").read_text())
    assert all(terms.get(t) for t in expected) and not any(t in terms for t in absent), sorted(terms)


def test_torchrun_two_ranks_share_identical_queues(caption_data, tmp_path, run):
    script = (Path(__file__).resolve().parents[1] / "helpers" / "dump_queues_main.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    args = train_args(caption_data, "csv", "ddp", 1)
    run([*torchrun, str(script), *args], tmp_path)
    q0, q1 = (torch.load(tmp_path / f"queues_rank{r}.pt", weights_only=True) for r in (0, 1))
    # 30 rows over 2 ranks x batch 8, drop_last: 1 step of a global batch of 16 keys.
    assert int(q0["ptr"]) == int(q1["ptr"]) == 2 * BATCH
    assert torch.equal(q0["image"], q1["image"]) and torch.equal(q0["text"], q1["text"])
    terms = logged_terms((tmp_path / "logs" / "ddp" / "out.log").read_text())
    assert all(terms.get(t) for t in TERMS)


def test_flags_that_cannot_work_are_refused(caption_data, tmp_path):
    import subprocess

    cmd = [PYTHON, "-m", "open_clip_train.main", *train_args(caption_data, "csv", "bad", 1), "--accum-freq", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--accum-freq > 1" in proc.stderr + proc.stdout


def test_explicit_entry_point_without_startup_hook(caption_data, tmp_path, run):
    cmd = [PYTHON, "-m", "conlip_plugin.train", *train_args(caption_data, "csv", "entry", 1)]
    run(cmd, tmp_path, env={"CONLIP_PLUGIN_DISABLE": "1"})
    assert logged_terms((tmp_path / "logs" / "entry" / "out.log").read_text()).get("Conmim_loss")


def test_export_loads_in_plain_open_clip_with_same_embeddings(csv_run, caption_data, tmp_path, run):
    ckpt = csv_run / "checkpoints" / "epoch_2.pt"
    out = tmp_path / "export"
    run([PYTHON, "-m", "conlip_plugin.export", "--model", "conlip-tiny", "--checkpoint", str(ckpt),
         "--output", str(out)], tmp_path)
    probe = (
        "import sys, torch, open_clip\n"
        "assert 'conlip-tiny' not in open_clip.list_models()\n"
        f"model, _, pre = open_clip.create_model_and_transforms('local-dir:{out}')\n"
        f"tok = open_clip.get_tokenizer('local-dir:{out}')\n"
        "model.eval()\n"
        "torch.manual_seed(0)\n"
        "img = torch.randn(3, 3, 64, 64)\n"
        "txt = tok(['a red square', 'a blue circle on white', ''])\n"
        "with torch.no_grad():\n"
        "    torch.save({'img': img, 'txt': txt, 'i': model.encode_image(img), 't': model.encode_text(txt),\n"
        "                'type': type(model).__name__}, 'plain.pt')\n"
    )
    run([PYTHON, "-c", probe], tmp_path, env={"CONLIP_PLUGIN_DISABLE": "1"})
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain["type"] == "CustomTextCLIP"

    import open_clip

    model = open_clip.create_model("conlip-tiny", pretrained=str(ckpt)).eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(plain["img"]), plain["i"], atol=1e-6)
        assert torch.allclose(model.encode_text(plain["txt"]), plain["t"], atol=1e-6)


def test_startup_hook_is_light_and_can_be_disabled(tmp_path, run):
    probe = ("import sys, conlip_plugin; assert 'torch' not in sys.modules, 'torch imported at start-up'\n"
             "import logging, open_clip, open_clip_train.main; print('conlip-tiny' in open_clip.list_models())\n"
             "assert not logging.getLogger().handlers, 'a root handler at import doubles every log line'")
    on = run([PYTHON, "-c", probe], tmp_path)
    off = run([PYTHON, "-c", probe], tmp_path, env={"CONLIP_PLUGIN_DISABLE": "1"})
    assert on.stdout.strip() == "True" and off.stdout.strip() == "False"
