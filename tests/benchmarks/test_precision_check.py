"""The precision check: its table from health lines, and one short run through the stock CLI."""
import json

import pytest

from conlip_plugin.benchmarks import precision as precision_check

LINES = (
    "2026-11-28,10:00:00 | INFO | ConLIP health: step 50 skipped 3 nonfinite dcl_loss=0 conmlm_loss=1 "
    "conmim_loss=0 max_loss 30.5 instance_loss 18.1 collapse_at 18.8 embed_cos image=0.5 text=0.6 samples/s 800.0\n"
    "2026-11-28,10:00:05 | INFO | Train Epoch: 0 [6400/12800 (50%)] Loss: 29.1 (29.5)\n"
    "2026-11-28,10:00:09 | WARNING | ConLIP health: step 100 skipped 4 nonfinite dcl_loss=0 conmlm_loss=2 "
    "conmim_loss=0 max_loss 31.25 instance_loss 17.9 collapse_at 18.8 embed_cos image=0.4 text=0.5 samples/s 850.25\n"
)


def test_table_reports_the_last_health_line_of_each_run(tmp_path):
    log = tmp_path / "out.log"
    log.write_text(LINES)
    amp = {"precision": "amp", **precision_check.last_health(log), "wall_s": 12.4}
    bf16 = {"precision": "amp_bf16", "step": 100, "skipped": 0, "nonfinite": {"dcl_loss": 0, "conmlm_loss": 0},
            "max_loss": 29.0, "samples_per_s": 900.0, "wall_s": 11.6}
    lines = precision_check.markdown([amp, bf16], "HEADER").splitlines()
    assert lines[0] == "HEADER" and lines[1] == ""
    assert lines[2] == ("| precision | steps | skipped steps | non-finite dcl_loss | non-finite conmlm_loss | "
                        "non-finite conmim_loss | largest loss | samples/s | wall s |")
    assert lines[3] == "|---|---|---|---|---|---|---|---|---|"
    assert lines[4] == "| amp | 100 | 4 | 0 | 2 | 0 | 31.25 | 850.2 | 12 |"
    assert lines[5] == "| amp_bf16 | 100 | 0 | 0 | 0 | - | 29 | 900.0 | 12 |"
    assert len(lines) == 6


def test_no_health_line_and_unreported_steps_are_refused(tmp_path):
    log = tmp_path / "out.log"
    log.write_text(LINES.splitlines()[1] + "\n")
    assert precision_check.last_health(log) is None
    with pytest.raises(SystemExit) as exit_info:
        precision_check.main(["--steps", "60", "--out", str(tmp_path)])
    assert exit_info.value.code == 2  # the health line comes every 50 steps: 51..60 would go unreported


def test_cuda_asked_without_a_gpu_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """open_clip_train would fall back to the CPU and train the paper-size model for hours."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        precision_check.main(["--device", "cuda", "--out", str(tmp_path)])
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_the_paper_size_on_the_cpu_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """The default size is the paper's: on a machine without a GPU, the default device (cpu) must not
    start hours of training."""
    monkeypatch.setattr(precision_check, "register_model", lambda *args: pytest.fail("a model was built"))
    with pytest.raises(SystemExit):
        precision_check.main(["--device", "cpu", "--out", str(tmp_path)])
    assert "--size paper on the CPU would train" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_fp32_run_through_the_stock_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    precision_check.main(["--size", "tiny", "--precisions", "fp32", "--steps", "50", "--batch-size", "8",
                          "--device", "cpu", "--workers", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "precision.json").read_text())
    (run,) = report["runs"]
    assert report["device"] == "cpu" and report["steps"] == 50 and run["precision"] == "fp32"
    assert run["step"] == 50 and run["skipped"] == 0 and run["samples_per_s"] > 0
    assert run["nonfinite"] == {"dcl_loss": 0, "conmlm_loss": 0, "conmim_loss": 0}
    assert "| fp32 | 50 | 0 | 0 | 0 | 0 |" in (tmp_path / "precision.md").read_text()
    assert not (tmp_path / "run-fp32" / "checkpoints").exists()
    assert "Train Epoch: 0 [400/400 (100%)]" in (tmp_path / "run-fp32" / "out.log").read_text()


def test_a_failed_run_and_a_non_finite_loss_term_fail_the_check_after_the_table(tmp_path, monkeypatch):
    def fake_train(model, precision, args, configs):
        if precision == "amp":
            raise precision_check.RunFailed("the amp run exited 1; see amp.log")
        return {"precision": precision, "step": 50, "skipped": 1, "nonfinite": {"dcl_loss": 0, "conmlm_loss": 2},
                "max_loss": 30.0, "samples_per_s": 10.0, "wall_s": 1.0}

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(precision_check, "device_name", lambda device: "a GPU")
    monkeypatch.setattr(precision_check, "register_model", lambda size, tokenizer_dir, workdir: "fake")
    monkeypatch.setattr(precision_check, "train", fake_train)
    with pytest.raises(SystemExit) as exit_info:
        precision_check.main(["--steps", "50", "--device", "cuda", "--out", str(tmp_path)])
    message = str(exit_info.value.code)
    assert "the amp run exited 1; see amp.log" in message and "amp_bf16 conmlm_loss=2" in message
    table = (tmp_path / "precision.md").read_text()
    assert "| amp_bf16 | 50 | 1 | 0 | 2 |" in table and "| amp |" not in table
    assert "conlip-vit-b16-bert, random-init towers" in table.splitlines()[0]
