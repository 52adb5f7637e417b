"""clip_benchmark on a conlip-tiny training checkpoint and on its export, on a prepared folder."""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
PY = sys.executable


@pytest.fixture(scope="module")
def trained(caption_data, tmp_path_factory, run):
    """One epoch of conlip-tiny, and a flickr30k-layout test folder made by the preparation tool."""
    cwd = tmp_path_factory.mktemp("eval")
    run([PY, "-m", "open_clip_train.main", "--model", "conlip-tiny", "--train-data", str(caption_data["csv"]),
         "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key",
         "title", "--batch-size", "10", "--epochs", "1", "--lr", "5e-4", "--precision", "fp32", "--device",
         "cpu", "--workers", "1", "--name", "run"], cwd)
    images = cwd / "flickr-images"
    images.mkdir()
    entries = []
    for i, path in enumerate(sorted((caption_data["root"] / "images").glob("*.png"))):
        name = f"{i:04d}.jpg"
        Image.open(path).convert("RGB").save(images / name)
        caption = _caption_of(caption_data, path)
        entries.append({"filename": name, "imgid": i, "split": "test",
                        "sentences": [{"raw": caption}, {"raw": caption.replace(" on a white background", "")}]})
    karpathy = cwd / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    root = cwd / "flickr30k"
    run([PY, "-m", "conlip_plugin.data.prepare", "eval-layout", "--dataset", "flickr30k",
         "--karpathy-json", str(karpathy), "--images", str(images), "--out", str(root)], cwd)
    return {"cwd": cwd, "ckpt": cwd / "logs" / "run" / "checkpoints" / "epoch_1.pt", "root": root, "entries": entries}


def _caption_of(data: dict, path: Path) -> str:
    import csv

    with open(data["csv"]) as f:
        return {row["filepath"]: row["title"] for row in csv.DictReader(f)}[str(path)]


def _benchmark(run, cwd, model, root, out, pretrained=None, env=None):
    cmd = ["clip_benchmark", "eval", "--model", model, "--dataset", "flickr30k", "--dataset_root", str(root),
           "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10", "--no_amp", "--batch_size", "8",
           "--num_workers", "0", "--output", str(out)]
    if pretrained:
        cmd += ["--pretrained", str(pretrained)]
    run([str(Path(PY).with_name("clip_benchmark")), *cmd[1:]], cwd, env=env)
    return json.loads(out.read_text())["metrics"]


def recall_by_loops(image_emb, text_emb, text_to_image, k):
    """Karpathy R@K, both ways, by explicit loops in float64."""
    sims = (text_emb.double() @ image_emb.double().t()).tolist()
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    t2i = 0
    for t in range(n_txt):
        better = sum(1 for i in range(n_img) if sims[t][i] > sims[t][text_to_image[t]])
        t2i += better < k
    i2t = 0
    for i in range(n_img):
        own = [t for t in range(n_txt) if text_to_image[t] == i]
        best = max(sims[t][i] for t in own)
        better = sum(1 for t in range(n_txt) if sims[t][i] > best)
        i2t += better < k
    return t2i / n_txt, i2t / n_img


def test_checkpoint_and_export_give_identical_metrics_equal_to_independent_recall(trained, run):
    cwd = trained["cwd"]
    direct = _benchmark(run, cwd, "conlip-tiny", trained["root"], cwd / "direct.json", pretrained=trained["ckpt"])
    export = cwd / "export"
    run([PY, "-m", "conlip_plugin.integration.export", "--model", "conlip-tiny", "--checkpoint", str(trained["ckpt"]),
         "--output", str(export)], cwd)
    exported = _benchmark(run, cwd, f"local-dir:{export}", trained["root"], cwd / "export.json",
                          env={"CONLIP_PLUGIN_DISABLE": "1"})
    keys = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
    assert set(keys) <= set(direct)
    for key in keys:
        assert direct[key] == pytest.approx(exported[key], abs=1e-9), key

    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("conlip-tiny", pretrained=str(trained["ckpt"]))
    tokenizer = open_clip.get_tokenizer("conlip-tiny")
    model.eval()
    # The layout as written (what clip_benchmark read), parsed here independently.
    lines = (trained["root"] / "flickr30k_test_karpathy.txt").read_text().splitlines()[1:]
    files, captions, owner = [], [], []
    for line in filter(None, lines):
        name, caption = line.split(".jpg,", 1)
        if name + ".jpg" not in files:
            files.append(name + ".jpg")
        captions.append(caption)
        owner.append(files.index(name + ".jpg"))
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(trained["root"] / f).convert("RGB")) for f in files])
        image_emb = model.encode_image(images, normalize=True)
        text_emb = model.encode_text(tokenizer(captions), normalize=True)
    for k in (1, 5, 10):
        t2i, i2t = recall_by_loops(image_emb, text_emb, owner, k)
        assert direct[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=1e-6)
        assert direct[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=1e-6)


def test_analysis_tool_reports_table_and_plot(trained, caption_data, run):
    out = trained["cwd"] / "analysis"
    proc = run([PY, str(SCRIPTS / "analyze_attention.py"), "--csv", str(caption_data["csv"]), "--csv-separator", ",",
                "--batch-size", "10", "--out", str(out),
                "--checkpoint", f"ConLIP=conlip-tiny:{trained['ckpt']}"], trained["cwd"])
    results = json.loads((out / "results.json").read_text())["ConLIP"]
    assert 0 < results["mlm_layer0"]["mean"] < 1 and 0 < results["mim_layer0"]["mean"] < 1
    assert results["mim_layer0"]["count"] == 30 * 2 * 16  # 30 images x 2 heads x 16 patches
    assert (out / "table2.png").stat().st_size > 0 and "ConLIP" in proc.stdout
