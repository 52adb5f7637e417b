"""The main job: open_clip's CLIP, CLIP + ConMLM + ConMIM, CL, Vanilla and ConLIP on real emoji
image-caption pairs, evaluated and shown.

Builds the emoji data from npm packages (``conlip-emoji``), pre-trains ``conlip-emoji-clip`` (the
towers alone: open_clip's own CLIP loss), ``conlip-emoji-clip+conmlm-conmim``, ``conlip-emoji-cl``,
``conlip-emoji-vanilla`` and ``conlip-emoji`` (a small ViT at the emoji's native 64 px and the
pretrained all-MiniLM-L6-v2 text tower; the same towers, data, flags, budget and seeds, so that
the arms differ only in their losses) through the unmodified
``open_clip_train.main``, evaluates each with the stock ``clip_benchmark`` on the cross-style and
unseen-emoji splits, measures the heads' attention to the instance slot (paper Table 2) and
writes a report folder: results table, loss curves, Table 2 plot, and a retrieval gallery.

    conlip-demo [--out runs/demo] [--seeds N] [--epochs 1] [--smoke]

This is the ``conlip-demo`` command; ``python -m conlip_plugin.evaluation.demo`` and
``python scripts/demo.py`` (``bash scripts/run-demo``) in a checkout run the same.
"""
import argparse
import base64
import html
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Dict, List, Optional, Tuple

import torch

from conlip_plugin.arguments import positive_int
from conlip_plugin.data.karpathy import EVAL_DATASETS, read_flickr_annotation
from conlip_plugin.evaluation.ranks import (DIRECTIONS, RECALL_K, bootstrap_interval, hits, query_images, rank_check, recall,
                    retrieval_ranks)

# label -> model config suffix; the smoke run swaps in the tiny random towers (same code path, seconds).
VARIANTS = (("CLIP", "-clip"), ("CLIP+ConMLM+ConMIM", "-clip+conmlm-conmim"), ("CL", "-cl"),
            ("Vanilla", "-vanilla"), ("ConLIP", ""))
# (arm, baseline) pairs whose differences the report tests against the noise.
COMPARISONS = (("ConLIP", "Vanilla"), ("ConLIP", "CL"), ("ConLIP", "CLIP"), ("CLIP+ConMLM+ConMIM", "CLIP"))
SPLITS = (("cross-style", "test-cross-style"), ("unseen", "test-unseen"))
METRICS = [(f"{d}_retrieval_recall@{k}", f"{'T2I' if d == 'image' else 'I2T'} R@{k}")
           for d in DIRECTIONS for k in RECALL_K]


def say(msg: str) -> None:
    """A time-stamped progress line, flushed at once: the job runs for many minutes."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stream(cmd: List[str], log: Path, show=lambda line: False) -> None:
    """Run ``cmd``, keeping its whole output in ``log`` and echoing the lines ``show`` picks."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if show(line):
                print("    " + line.strip()[-150:], flush=True)
        if proc.wait() != 0:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\nsee {log}")


def loss_curves(log: str) -> Dict[str, List[float]]:
    """Every logged per-step value of each loss term, in order."""
    curves: Dict[str, List[float]] = {}
    for line in log.splitlines():
        if "Train Epoch" in line:
            for key, val in re.findall(r"(\w+_loss): ([-\d.e+]+) \(", line):
                curves.setdefault(key.lower(), []).append(float(val))
    return curves


def random_start(model: str, seed: int, out: Path) -> Path:
    """A random-init checkpoint of a plain config whose text folder has no weights (the tiny BERT):
    open_clip_train would load them at creation; from ``--pretrained`` it does not."""
    import open_clip

    base = model.split("+")[0]
    path = out / "runs" / f"init-{base}-s{seed}.pt"
    if not path.exists():
        torch.manual_seed(seed)
        torch.save({"state_dict": open_clip.create_model(base, pretrained_text=False).state_dict()}, path)
    return path


def train(model: str, seed: int, data: Path, out: Path, args: argparse.Namespace, gpu: bool) -> Path:
    """One model trained by the unmodified open_clip_train.main; a finished run's checkpoint is reused."""
    name = f"{model}-s{seed}"
    ckpt = out / "runs" / name / "checkpoints" / f"epoch_{args.epochs}.pt"
    if ckpt.exists():
        say(f"{name}: checkpoint exists, skipping training")
        return ckpt
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", model,
           "--train-data", str(data / "train" / "train.csv"), "--dataset-type", "csv",
           "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr), "--wd", "0.01",
           "--warmup", "10", "--lr-scheduler", "const-cooldown", "--epochs-cooldown", str(args.epochs),
           "--lr-cooldown-power", "1.0", "--workers", "2", "--seed", str(seed), "--log-every-n-steps", "10",
           "--precision", "amp" if gpu else "fp32", "--device", "cuda" if gpu else "cpu",
           "--logs", str(out / "runs"), "--name", name, "--resume", "latest"]
    if args.smoke and "-clip" in model:
        cmd += ["--pretrained", str(random_start(model, seed, out))]
    if not args.smoke:
        # The pretrained MiniLM stays fixed (LiT-style; its projection and layer norms train): on
        # two CPU cores the budget goes to the image tower and ConLIP's heads. ConMLM still acts on
        # the image tower through the image CLS slot of its memory, which is the paper's mechanism.
        cmd += ["--lock-text"]
    say(f"training {name}")
    stream(cmd, out / "runs" / f"{name}.stdout", show=lambda line: "Train Epoch" in line)
    return ckpt


def evaluate(model: str, ckpt: Path, root: Path, out_json: Path, gpu: bool) -> dict:
    """clip_benchmark's retrieval metrics of a checkpoint on one split; an earlier result is reused."""
    if not out_json.exists():
        cmd = [sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", model,
               "--pretrained", str(ckpt), "--dataset", "flickr30k", "--dataset_root", str(root),
               "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10", "--batch_size", "128",
               "--num_workers", "2", "--output", str(out_json)]
        if not gpu:
            cmd.append("--no_amp")
        stream(cmd, out_json.with_suffix(".log"))
    return json.loads(out_json.read_text())["metrics"]


def summarise(results: Dict[str, Dict[str, List[dict]]], ranks: Dict[str, Dict[str, List[dict]]], seeds: int) -> str:
    """The results table (mean ± spread over seeds) and a plain statement about the noise.

    Two sources of noise are checked: the test set (a paired bootstrap over its images, each with
    all its captions, which one seed already allows) and, with two or more seeds, training (the
    spread over seeds; with few seeds a rough bound). A difference is called outside the noise
    only when it is outside both. Differences and intervals come from the per-query ranks.
    """
    lines = ["| split | model | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for split, _ in SPLITS:
        for label, _ in VARIANTS:
            runs = results[split][label]
            cells = []
            for key, _ in METRICS:
                vals = [100 * r[key] for r in runs]
                cells.append(f"{mean(vals):.1f}" + (f" ± {stdev(vals):.1f}" if len(vals) > 1 else ""))
            lines.append(f"| {split} | {label} | " + " | ".join(cells) + " |")
    notes = []
    for split, _ in SPLITS:
        for arm, other in COMPARISONS:
            for direction, k, name in (("image", 1, "T2I R@1"), ("text", 1, "I2T R@1"),
                                       ("image", 10, "T2I R@10"), ("text", 10, "I2T R@10")):
                mine, theirs = ranks[split][arm], ranks[split][other]
                hits_a, hits_b = hits(mine, direction, k), hits(theirs, direction, k)
                diff = 100 * float(hits_a.mean() - hits_b.mean())
                low, high = bootstrap_interval(hits_a, hits_b, query_images(mine[0], direction))
                outside = low > 0 or high < 0
                detail = f"95% bootstrap interval over the test images [{low:+.1f}, {high:+.1f}]"
                if seeds < 2:
                    detail += "; one seed only, so the spread over training seeds (usually the larger noise) is not measured"
                else:
                    a = [recall(r, direction, k) for r in mine]
                    b = [recall(r, direction, k) for r in theirs]
                    noise = 2 * math.sqrt((stdev(a) ** 2 + stdev(b) ** 2) / seeds)
                    outside = outside and abs(diff) > noise
                    detail += f"; 2 standard errors over seeds = {noise:.1f}"
                verdict = "outside the noise" if outside else "inside the noise"
                notes.append(f"- {split}, {name}: {arm} − {other} = {diff:+.1f} points, {verdict} ({detail}).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot_losses(curves: Dict[str, Dict[str, List[float]]], path: Path) -> None:
    """One panel per loss term, the variants overlaid: their terms differ, their shared ones compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = sorted({t for c in curves.values() for t in c})
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for label, c in curves.items():
            if term in c:
                ax.plot(c[term], label=label)
        ax.set_title(term)
        ax.set_xlabel("logged step (every 10 steps)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_pairs(root: Path) -> List[Tuple[str, str]]:
    """(image file, caption) pairs of a clip_benchmark flickr30k-layout folder, one per T2I query."""
    annotation = root / EVAL_DATASETS["flickr30k"].annotation
    return [(name, caption) for name, captions in read_flickr_annotation(annotation) for caption in captions]


def embed(model_name: str, ckpt: Path, root: Path, files: List[str], captions: List[str]):
    """Normalised embeddings of the images and captions, with the model's eval preprocessing."""
    import open_clip
    from PIL import Image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(ckpt), device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    with torch.no_grad():
        image_emb = torch.cat([model.encode_image(torch.stack([preprocess(Image.open(root / f).convert("RGB"))
                                                               for f in files[i:i + 256]]).to(device), normalize=True)
                               for i in range(0, len(files), 256)])
        text_emb = torch.cat([model.encode_text(tokenizer(captions[i:i + 256]).to(device), normalize=True)
                              for i in range(0, len(captions), 256)])
    return image_emb.float().cpu(), text_emb.float().cpu()


def query_ranks(model_name: str, ckpt: Path, root: Path) -> Dict[str, torch.Tensor]:
    """Per query, the rank of its first correct answer (0: top), as clip_benchmark scores them:
    T2I, one query per caption (its image); I2T, one query per image (any of its captions)."""
    pairs = read_pairs(root)
    files = sorted({f for f, _ in pairs})
    image_emb, text_emb = embed(model_name, ckpt, root, files, [c for _, c in pairs])
    truth = torch.tensor([files.index(f) for f, _ in pairs])
    return dict(retrieval_ranks(text_emb @ image_emb.t(), truth), caption_image=truth)




def gallery(model_name: str, ckpt: Path, root: Path, report: Path, queries: int = 6) -> None:
    """Paper Figure 5: text queries and their top-5 images with scores, as PNG and HTML."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    pairs = read_pairs(root)
    files = sorted({f for f, _ in pairs})
    step = max(1, len(pairs) // queries)
    chosen = pairs[::step][:queries]
    image_emb, text_emb = embed(model_name, ckpt, root, files, [c for _, c in chosen])
    scores, top = (text_emb @ image_emb.t()).topk(5, dim=1)
    fig, axes = plt.subplots(len(chosen), 6, figsize=(11, 1.6 * len(chosen)),
                             gridspec_kw={"width_ratios": [2.6, 1, 1, 1, 1, 1]})
    rows_html = []
    for r, (truth, caption) in enumerate(chosen):
        axes[r, 0].text(0, 0.5, textwrap.fill(caption, 34), fontsize=7, va="center")
        axes[r, 0].axis("off")
        cells = [f"<td>{html.escape(caption)}</td>"]
        for c in range(5):
            f = files[top[r, c]]
            axes[r, c + 1].imshow(Image.open(root / f))
            axes[r, c + 1].set_title(f"{scores[r, c]:.2f}" + (" ✓" if f == truth else ""), fontsize=7)
            axes[r, c + 1].axis("off")
            data = base64.b64encode((root / f).read_bytes()).decode()
            mark = " style='outline:3px solid green'" if f == truth else ""
            cells.append(f"<td><img src='data:image/jpeg;base64,{data}' width=64{mark}><br>{scores[r, c]:.3f}</td>")
        rows_html.append("<tr>" + "".join(cells) + "</tr>")
    fig.savefig(report / "gallery.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (report / "gallery.html").write_text(
        "<html><body><h2>Text query → top-5 images (ConLIP, cross-style split; green: the query's own image)</h2>"
        "<table border=1 cellpadding=4>" + "".join(rows_html) + "</table></body></html>\n")


def retrieval_index(model_name: str, ckpt: Path, root: Path, out: Path) -> Path:
    """The test images with their first captions, indexed by ``conlip-retrieval`` for search and serving;
    built after the report is written, so a failure here loses none of the results."""
    from conlip_plugin.retrieval.cli import main as retrieval

    first_caption: Dict[str, str] = {}
    for name, caption in read_pairs(root):
        first_caption.setdefault(name, caption)
    table = out / "gallery.tsv"
    table.write_text("filepath\ttitle\n" + "".join(f"{(root / name).resolve()}\t{caption}\n"
                                                     for name, caption in sorted(first_caption.items())))
    index = out / "retrieval-index"
    shutil.rmtree(index, ignore_errors=True)  # the demo's own index, of this run's freshly trained model
    retrieval(["index", "--model", model_name, "--pretrained", str(ckpt), "--images", str(table), "--out", str(index),
               "--no-progress"])
    return index


def main(argv: Optional[List[str]] = None) -> None:
    """The `conlip-demo` command (argv: its arguments; default sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help="default: 3 on a GPU; 1 on a CPU, where one seed fills the 30-minute budget")
    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--smoke", action="store_true",
                        help="small data, tiny random towers, one seed: a few minutes, for CI")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.smoke:
        args.seeds = 1
    elif args.seeds is None:
        args.seeds = 3 if gpu else 1
    out = args.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    report = out / "report"
    report.mkdir(exist_ok=True)
    started = time.time()

    say("building the emoji data (npm packages, cached after the first run)")
    data = out / "data"
    built = subprocess.run([sys.executable, "-m", "conlip_plugin.data.emoji", "--out", str(data)]
                           + (["--smoke"] if args.smoke else []))
    if built.returncode != 0:
        sys.exit(f"building the emoji data failed (exit {built.returncode}); its message is above")

    family = "conlip-tiny" if args.smoke else "conlip-emoji"
    results = {split: {label: [] for label, _ in VARIANTS} for split, _ in SPLITS}
    ranks = {split: {label: [] for label, _ in VARIANTS} for split, _ in SPLITS}
    curves, checkpoints = {}, {}
    for seed in range(args.seeds):
        for label, suffix in VARIANTS:
            model = family + suffix
            ckpt = train(model, seed, data, out, args, gpu)
            checkpoints[(label, seed)] = ckpt
            log = (out / "runs" / f"{model}-s{seed}" / "out.log").read_text()
            if seed == 0:
                curves[label] = loss_curves(log)
            for split, folder in SPLITS:
                say(f"evaluating {label} seed {seed} on {split}")
                metrics = evaluate(model, ckpt, data / folder, out / "runs" / f"{model}-s{seed}-{split}.json", gpu)
                results[split][label].append(metrics)
                ranks[split][label].append(query_ranks(model, ckpt, data / folder))

    say("measuring the heads' attention to the instance slot (paper Table 2)")
    stream([sys.executable, "-m", "conlip_plugin.evaluation.attention", "--csv", str(data / "train" / "train.csv"),
            "--batches", "4", "--batch-size", "64", "--out", str(report),
            "--checkpoint", f"ConLIP={family}:{checkpoints[('ConLIP', 0)]}",
            "--checkpoint", f"Vanilla={family}-vanilla:{checkpoints[('Vanilla', 0)]}",
            "--checkpoint", f"CLIP+ConMLM+ConMIM={family}-clip+conmlm-conmim:{checkpoints[('CLIP+ConMLM+ConMIM', 0)]}"],
           out / "analysis.log")
    say("drawing loss curves and the retrieval gallery")
    plot_losses(curves, report / "losses.png")
    gallery(family, checkpoints[("ConLIP", 0)], data / "test-cross-style", report)

    table = summarise(results, ranks, args.seeds)
    chance = ", ".join(f"{split} {100 / len({f for f, _ in read_pairs(data / folder)}):.2f}"
                       for split, folder in SPLITS)
    table += f"\nChance level of T2I R@1 (one right image among N), in %: {chance}.\n"
    gap = rank_check(results, ranks)
    table += (f"\nThe per-query ranks behind the bootstrap intervals are recomputed here from the same "
              f"checkpoints; they reproduce clip_benchmark's R@1/5/10 to within {gap:.2f} points (exact ties, "
              f"from duplicate captions of different emoji, count against the query here).\n")
    table2 = (report / "table.md").read_text()
    text = (f"# ConLIP demo on emoji ({family}; {args.seeds} seed(s), "
            f"{args.epochs} epoch(s), {'GPU' if gpu else 'CPU'}, {time.time() - started:.0f} s)\n\n"
            f"Zero-shot retrieval, Recall@K in % (T2I: text→image, I2T: image→text):\n\n{table}\n"
            f"Cross-attention weight on the other modality's CLS slot (paper Table 2):\n\n{table2}\n"
            "Files: losses.png, table2.png, gallery.png, gallery.html, results.json\n")
    (report / "README.md").write_text(text)
    (report / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + text)
    say(f"report written to {report}")
    say("indexing the cross-style test images with the ConLIP model (conlip-retrieval)")
    index = retrieval_index(family, checkpoints[("ConLIP", 0)], data / "test-cross-style", out)
    say(f"search the test images in a browser: conlip-retrieval serve --index {index}")


if __name__ == "__main__":
    main()
