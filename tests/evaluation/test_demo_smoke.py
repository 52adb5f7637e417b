"""The main job (conlip-demo, scripts/run-demo) in its smoke form: emoji data from npm, five models, report."""
import json
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def test_former_script_and_module_run_the_command(tmp_path, run):
    """scripts/demo.py (what scripts/run-demo runs) and the module are the conlip-demo command."""
    for cmd in ([sys.executable, str(DEMO)], [sys.executable, "-m", "conlip_plugin.evaluation.demo"]):
        assert "--smoke" in run([*cmd, "--help"], tmp_path).stdout


@pytest.mark.skipif(shutil.which("npm") is None, reason="the emoji data comes from the npm registry: install npm")
def test_smoke_demo_writes_the_report(tmp_path, run):
    proc = run([sys.executable, str(DEMO), "--smoke", "--out", str(tmp_path / "demo")], tmp_path, timeout=900)
    report = tmp_path / "demo" / "report"
    results = json.loads((report / "results.json").read_text())
    assert set(results) == {"cross-style", "unseen"}
    for split in results.values():
        assert set(split) == {"CLIP", "CLIP+ConMLM+ConMIM", "CL", "Vanilla", "ConLIP"}
        for runs in split.values():
            assert len(runs) == 1
            for k in (1, 5, 10):
                assert 0.0 <= runs[0][f"image_retrieval_recall@{k}"] <= 1.0
            assert runs[0]["image_retrieval_recall@1"] <= runs[0]["image_retrieval_recall@10"]
    for name in ("losses.png", "table2.png", "gallery.png", "gallery.html", "README.md", "table.md"):
        assert (report / name).stat().st_size > 0, name
    assert "one seed only" in (report / "README.md").read_text()
    assert "report written" in proc.stdout
    index = tmp_path / "demo" / "retrieval-index"
    assert f"conlip-retrieval serve --index {index}" in proc.stdout
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["items"] == manifest["counts"]["captions"] > 0
