"""The benchmark script's tiny CPU mode: it runs, and its counts are coherent."""
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def test_bench_tiny_mode_reports_both_steps(tmp_path, run):
    out = tmp_path / "bench.json"
    proc = run([sys.executable, str(BENCH), "--size", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "1",
                "--device", "cpu", "--json", str(out)], tmp_path)
    report = json.loads(out.read_text())
    clip, conlip = report["results"]["CLIP"], report["results"]["ConLIP"]
    # ConLIP runs each tower on 2B online inputs plus B momentum inputs, and the heads: well over 2x CLIP.
    assert conlip["flop_ratio_to_clip"] > 2.0
    assert clip["speed_ratio_to_clip"] == 1.0 and 0 < conlip["speed_ratio_to_clip"]
    for r in (clip, conlip):
        assert r["samples_per_s"] > 0 and 0 < r["mfu"] < 2
    assert "ConLIP" in proc.stdout and "MFU" in proc.stdout
