"""Pre-emption: ``kill -9`` at any moment, then ``--resume latest`` goes on from the state it saved.

The slow tests kill real ``open_clip_train.main`` runs (their whole process group, data workers
included, as a pre-empted machine would) mid-epoch and while a checkpoint is being written,
truncate a checkpoint by hand as an older version's kill would have left it, and record the
state right after the resume load with ``state_after_resume_main.py`` to compare it bit for bit.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import conlip_plugin
from conlip_plugin.reliability.checkpoints import (
    UnreadableCheckpoint,
    WrongModelCheckpoint,
    atomic_save,
    checkpoint_problem,
    newest_readable,
    partial_path,
)
from tiny_configs import native_base
from model_state import assert_bitwise_equal

PYTHON = sys.executable
HELPER = str((Path(__file__).resolve().parents[1] / "helpers" / "state_after_resume_main.py"))
TRAINING_STATE = ("momentum_visual.", "momentum_text.", "image_queue.features", "image_queue.ptr",
                  "text_queue.features", "text_queue.ptr")


@pytest.fixture(scope="module")
def main_module():
    """``open_clip_train.main`` in this process with the plugin's names in place, as ``main()`` has them."""
    conlip_plugin.activate()
    import open_clip_train.main as main
    from conlip_plugin.integration.patching import patch_mains

    patch_mains()
    return main


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _tiny_checkpoints(folder: Path, epochs=(1, 2, 10)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        torch.save({"epoch": epoch, "state_dict": {"w": torch.full((4, 4), float(epoch))}}, folder / f"epoch_{epoch}.pt")


# --- the pure pieces ------------------------------------------------------------------------


def test_checkpoint_problem_tells_complete_from_cut_short_and_foreign_files(tmp_path):
    _tiny_checkpoints(tmp_path, (1,))
    good = tmp_path / "epoch_1.pt"
    assert checkpoint_problem(good) is None
    for keep in (0.0, 0.001, 0.5, 0.999):
        cut = tmp_path / f"cut_{keep}.pt"
        cut.write_bytes(good.read_bytes()[: int(good.stat().st_size * keep)])
        assert checkpoint_problem(cut).startswith(("is cut short", "is empty")), keep
    text = tmp_path / "notes.pt"
    text.write_text("learning rate 1e-4, batch 256\n")
    assert checkpoint_problem(text).startswith("is not a torch checkpoint")
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert "no data.pkl" in checkpoint_problem(tmp_path / "other.pt")
    assert checkpoint_problem(tmp_path / "missing.pt") == "does not exist"


def test_newest_readable_passes_over_files_cut_short(tmp_path):
    _tiny_checkpoints(tmp_path)
    _truncate(tmp_path / "epoch_10.pt")
    (tmp_path / "epoch_2.pt").write_bytes(b"")
    newest_first = [str(tmp_path / f"epoch_{e}.pt") for e in (10, 2, 1)]
    chosen, skipped = newest_readable(newest_first)
    assert chosen == newest_first[2]
    assert [p for p, _ in skipped] == newest_first[:2]
    assert newest_readable(newest_first[:2])[0] is None


def test_resume_latest_takes_the_newest_readable_checkpoint_with_a_warning(main_module, tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    _tiny_checkpoints(folder)
    assert main_module.get_latest_checkpoint(str(folder), remote=False).endswith("epoch_10.pt")
    assert not caplog.records, "a readable newest checkpoint is taken silently, as before"
    _truncate(folder / "epoch_10.pt")
    with caplog.at_level("WARNING"):
        chosen = main_module.get_latest_checkpoint(str(folder), remote=False)
    assert chosen == str(folder / "epoch_2.pt")
    warning = caplog.text
    assert str(folder / "epoch_10.pt") in warning and str(folder / "epoch_2.pt") in warning and "cut short" in warning


def test_atomic_save_leaves_the_old_file_or_the_whole_new_one(tmp_path, monkeypatch):
    target, plain = tmp_path / "epoch_3.pt", tmp_path / "plain" / "epoch_3.pt"
    atomic_save({"v": torch.zeros(3)}, target)
    plain.parent.mkdir()
    torch.save({"v": torch.ones(3)}, plain)
    atomic_save({"v": torch.ones(3)}, str(target))
    assert target.read_bytes() == plain.read_bytes(), "the file renamed into place is what torch.save writes"

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": torch.full((3,), 2.0)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_3.pt", "plain"]
    assert partial_path(str(target)) == str(tmp_path / "epoch_3.partial")


def test_open_clip_train_main_saves_through_atomic_save_and_sees_torch_otherwise(main_module):
    from conlip_plugin.patches.atomic_checkpoints import patch_main
    from conlip_plugin.patches.ddp_on_cpu import CpuTolerantDDP

    assert main_module.torch.save is atomic_save
    assert main_module.torch.optim is torch.optim and main_module.torch.cuda is torch.cuda
    assert main_module.torch.nn.parallel.DistributedDataParallel is CpuTolerantDDP
    proxy, latest = main_module.torch, main_module.get_latest_checkpoint
    patch_main(main_module)
    assert main_module.torch is proxy and main_module.get_latest_checkpoint is latest


@pytest.fixture(scope="module")
def tiny_conlip_weights(tmp_path_factory):
    """A conlip-tiny checkpoint in a run folder whose params.txt names the model, as open_clip_train writes it."""
    conlip_plugin.activate()
    import open_clip

    run = tmp_path_factory.mktemp("weights") / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text("lr: 0.0005\nmodel: conlip-tiny\nname: run\n")
    path = run / "checkpoints" / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": open_clip.create_model("conlip-tiny").state_dict()}, path)
    return path


def test_pretrained_that_is_not_a_checkpoint_names_the_file_and_what_to_give(tiny_conlip_weights, tmp_path):
    import open_clip

    text = tmp_path / "weights.pt"
    text.write_text("not weights\n")
    cut = tmp_path / "epoch_7.pt"
    cut.write_bytes(tiny_conlip_weights.read_bytes()[:100_000])
    for path, problem in ((text, "is not a torch checkpoint"), (cut, "is cut short")):
        with pytest.raises(UnreadableCheckpoint) as err:
            open_clip.create_model("conlip-tiny", pretrained=str(path))
        message = str(err.value)
        assert str(path) in message and problem in message and "--pretrained" in message and "epoch_N.pt" in message
    model = open_clip.create_model("conlip-tiny", pretrained=str(tiny_conlip_weights))
    assert type(model).__name__ == "ConLIP", "a readable checkpoint loads as before"


def test_checkpoint_of_another_model_names_both_models_and_the_fix(tiny_conlip_weights, tmp_path):
    import open_clip

    (tmp_path / "preemption-plain-tiny.json").write_text(json.dumps(native_base()))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(WrongModelCheckpoint) as err:
        open_clip.create_model("preemption-plain-tiny", pretrained=str(tiny_conlip_weights))
    message = str(err.value)
    params = tiny_conlip_weights.parent.parent / "params.txt"
    assert "'preemption-plain-tiny'" in message and "--model conlip-tiny" in message and str(params) in message
    assert "different model" in message and str(tiny_conlip_weights) in message


# --- real runs, killed ----------------------------------------------------------------------


def _args(data: dict, name: str, epochs: int, precision: str = "fp32", short_epochs: bool = False) -> list:
    """conlip-tiny on CPU over the caption set: the CSV, or (``short_epochs``, the practice for long
    epochs) resampled shards with an "epoch" of 80 samples, 10 steps, saved at its end."""
    args = ["--model", "conlip-tiny", "--batch-size", "8", "--epochs", str(epochs), "--lr", "5e-4", "--warmup", "2",
            "--precision", precision, "--device", "cpu", "--seed", "0", "--name", name, "--log-every-n-steps", "1",
            "--save-frequency", "1", "--workers", "1"]
    if short_epochs:
        return args + ["--train-data", str(data["shard"]), "--dataset-type", "webdataset", "--dataset-resampled",
                       "--train-num-samples", "80"]
    return args + ["--train-data", str(data["csv"]), "--dataset-type", "csv", "--csv-separator", ",",
                   "--csv-img-key", "filepath", "--csv-caption-key", "title"]


def _env(state_file: Path = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if state_file is not None:
        env["STATE_AFTER_RESUME"] = str(state_file)
    return env


def _start(cmd: list, cwd: Path, out: Path, env: dict) -> subprocess.Popen:
    with open(out, "w") as log:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, out: Path, timeout: float = 120.0) -> None:
    """SIGKILL the run's whole process group (data workers too) as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the moment to kill it:\n{out.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the moment to kill the run never came")
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _finish(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def assert_resumed_exactly(state_file: Path, checkpoint: Path) -> None:
    """The model (momentum encoders, queues and pointers included), optimizer and scaler right
    after the resume load equal the checkpoint's, bit for bit."""
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert Path(state["resume"]).resolve() == checkpoint.resolve()
    assert all(any(k.startswith(prefix) for k in saved["state_dict"]) for prefix in TRAINING_STATE)
    assert_bitwise_equal(state["model"], saved["state_dict"], "model")
    assert saved["optimizer"]["state"], "the checkpoint should hold optimizer moments"
    assert_bitwise_equal(state["optimizer"], saved["optimizer"], "optimizer")
    if "scaler" in saved:
        assert_bitwise_equal(state["scaler"], saved["scaler"], "scaler")


@pytest.fixture(scope="module")
def amp_run(caption_data, tmp_path_factory):
    """Three epochs under AMP (so the checkpoints carry a scaler), 3 steps each."""
    cwd = tmp_path_factory.mktemp("amp_run")
    _finish([PYTHON, "-m", "open_clip_train.main", *_args(caption_data, "run", 3, "amp")], cwd, _env())
    return cwd / "logs" / "run"


@pytest.mark.slow
def test_resume_latest_passes_over_a_checkpoint_cut_short(amp_run, caption_data, tmp_path):
    run = tmp_path / "logs" / "run"
    shutil.copytree(amp_run, run)
    ckpts = run / "checkpoints"
    _truncate(ckpts / "epoch_3.pt")
    state = tmp_path / "state.pt"
    _finish([PYTHON, HELPER, *_args(caption_data, "run", 3, "amp"), "--resume", "latest"], tmp_path, _env(state))
    log = (run / "out.log").read_text()
    warning = next(line for line in log.splitlines() if "WARNING" in line and "--resume latest" in line)
    assert "logs/run/checkpoints/epoch_3.pt, which is cut short" in warning and "logs/run/checkpoints/epoch_2.pt" in warning
    assert "(epoch 2)" in log
    assert_resumed_exactly(state, ckpts / "epoch_2.pt")
    assert checkpoint_problem(ckpts / "epoch_3.pt") is None, "the re-run epoch 3 replaced the file cut short"


@pytest.mark.slow
def test_explicit_resume_of_an_unreadable_file_names_it_and_the_fix(amp_run, caption_data, tmp_path):
    cut = tmp_path / "epoch_3.pt"
    shutil.copy(amp_run / "checkpoints" / "epoch_2.pt", tmp_path / "epoch_2.pt")
    shutil.copy(amp_run / "checkpoints" / "epoch_3.pt", cut)
    _truncate(cut)
    cmd = [PYTHON, "-m", "open_clip_train.main", *_args(caption_data, "again", 3, "amp"), "--resume", str(cut)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    message = next(line for line in proc.stderr.splitlines() if line.startswith("conlip-plugin: cannot resume"))
    assert f"cannot resume from {cut}" in message and "cut short" in message
    assert f"--resume {tmp_path / 'epoch_2.pt'}" in message and "--resume latest" in message
    assert "PytorchStreamReader" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_kill_mid_epoch_and_while_saving_then_resume_latest_goes_on(caption_data, tmp_path):
    """Short resampled "epochs" of 10 steps: killed in the 2nd epoch's first steps, resumed, killed
    again while the 2nd epoch's checkpoint is being written, resumed again: the run finishes, and
    each resume starts from exactly the state saved at the end of epoch 1."""
    run = tmp_path / "logs" / "run"
    ckpts, log = run / "checkpoints", run / "out.log"
    first = _start([PYTHON, "-m", "open_clip_train.main", *_args(caption_data, "run", 2, short_epochs=True)],
                   tmp_path, tmp_path / "first.out", _env())
    _kill_when(first, lambda: log.exists() and "Train Epoch: 1 [" in log.read_text(), tmp_path / "first.out")
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_1.pt"], "killed mid-epoch, before any other save"

    state = tmp_path / "state_second.pt"
    second = _start([PYTHON, HELPER, *_args(caption_data, "run", 2, short_epochs=True), "--resume", "latest"],
                    tmp_path, tmp_path / "second.out", _env(state))
    final, partial = ckpts / "epoch_2.pt", Path(partial_path(str(ckpts / "epoch_2.pt")))
    _kill_when(second, lambda: final.exists() or partial.exists(), tmp_path / "second.out")
    assert_resumed_exactly(state, ckpts / "epoch_1.pt")
    assert partial.exists() and not final.exists(), "killed while epoch_2 was being written, none cut short in place"

    state = tmp_path / "state_third.pt"
    _finish([PYTHON, HELPER, *_args(caption_data, "run", 2, short_epochs=True), "--resume", "latest"], tmp_path,
            _env(state))
    assert_resumed_exactly(state, ckpts / "epoch_1.pt")
    assert checkpoint_problem(final) is None
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_1.pt", "epoch_2.pt"], "nothing partial left behind"
