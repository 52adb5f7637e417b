"""The benchmark's (``conlip-bench``) tiny CPU mode: it runs, and its counts are coherent."""
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"  # the former script, now a wrapper


def test_bench_tiny_mode_reports_both_steps(tmp_path, run):
    out = tmp_path / "bench.json"
    proc = run([sys.executable, str(BENCH), "--size", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "1",
                "--device", "cpu", "--image-checkpoint-blocks", "0", "2", "--json", str(out)], tmp_path)
    report = json.loads(out.read_text())
    clip, conlip, recomputed = (report["results"][k] for k in ("CLIP", "ConLIP", "ConLIP-r2"))
    # ConLIP runs each tower on 2B online inputs plus B momentum inputs, and the heads: well over 2x CLIP.
    assert conlip["flop_ratio_to_clip"] > 2.0
    # Model FLOPs: recomputing blocks does not count as work done (MFU, not hardware utilisation).
    assert recomputed["gflop_per_sample"] == conlip["gflop_per_sample"]
    assert clip["speed_ratio_to_clip"] == 1.0 and 0 < conlip["speed_ratio_to_clip"]
    for r in (clip, conlip, recomputed):
        assert r["samples_per_s"] > 0 and 0 < r["mfu"] < 2
    assert "ConLIP-r2" in proc.stdout and "MFU" in proc.stdout
