"""The main job: open_clip's CLIP, CLIP + ConMLM + ConMIM, CL, Vanilla and ConLIP on real emoji
image-caption pairs, evaluated and shown.

Builds the emoji data from npm packages (``conlip-emoji``), pre-trains ``conlip-emoji-clip`` (the
towers alone: open_clip's own CLIP loss), ``conlip-emoji-clip+conmlm-conmim``, ``conlip-emoji-cl``,
``conlip-emoji-vanilla`` and ``conlip-emoji`` (a small ViT at the emoji's native 64 px and the
pretrained all-MiniLM-L6-v2 text tower; the same towers, data, flags, budget and seeds, so that
the arms differ only in their losses) through the unmodified
``open_clip_train.main``, evaluates each with the stock ``clip_benchmark`` on the cross-style and
unseen-emoji splits, measures the heads' attention to the instance slot (paper Table 2) and
writes a report folder: results table, loss curves, Table 2 plot, and a retrieval gallery (drawn by
``conlip_plugin.evaluation.demo_report``; this module runs the pipeline). The trainings and
clip_benchmark run as ``python -m`` commands, each in a process forked from one server that imported
their libraries once (``workers``).

    conlip-demo [--out runs/demo] [--seeds N] [--epochs 1] [--smoke]

This is the ``conlip-demo`` command; ``python -m conlip_plugin.evaluation.demo`` and
``python scripts/demo.py`` (``bash scripts/run-demo``) in a checkout run the same.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from conlip_plugin.arguments import positive_int
from conlip_plugin.data.karpathy import EVAL_DATASETS, read_flickr_annotation
from conlip_plugin.evaluation import demo_report
from conlip_plugin.evaluation.attention import main as attention
from conlip_plugin.evaluation.ranks import rank_check, retrieval_ranks
from conlip_plugin.retrieval.encoder import Encoder, decode_image

# label -> model config suffix; the smoke run swaps in the tiny random towers (same code path, seconds).
VARIANTS = (("CLIP", "-clip"), ("CLIP+ConMLM+ConMIM", "-clip+conmlm-conmim"), ("CL", "-cl"),
            ("Vanilla", "-vanilla"), ("ConLIP", ""))
SPLITS = (("cross-style", "test-cross-style"), ("unseen", "test-unseen"))
# What the entry modules import (not the entry modules themselves, which run as __main__ each time).
PRELOADED = ["open_clip_train.data", "open_clip_train.params", "open_clip_train.train", "clip_benchmark.datasets.builder",
             "clip_benchmark.metrics.zeroshot_retrieval", "clip_benchmark.models"]
EMBED_BATCH = 256  # images or captions per forward pass of the per-query ranks and the gallery


def say(msg: str) -> None:
    """A time-stamped progress line, flushed at once: the job runs for many minutes."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def workers() -> multiprocessing.context.BaseContext:
    """Where the trainings and clip_benchmark run: processes forked from one server that imported
    open_clip_train and clip_benchmark once (the imports take longer than a smoke training), each
    starting from that server's untouched state."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOADED)
    return ctx


def module_main(module: str, argv: List[str], log: str) -> None:
    """A worker's body: ``python -m MODULE ARGV``, its output appended to ``log``; its own children
    (data loader workers) start as a fresh interpreter's would, not from the server."""
    multiprocessing.set_start_method(None, force=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_module(ctx: multiprocessing.context.BaseContext, module: str, argv: List[str], log: Path,
               show=lambda line: False) -> None:
    """``python -m MODULE ARGV`` in a ``ctx`` process, keeping its whole output in ``log`` and echoing
    the lines ``show`` picks while it runs; a failure ends the demo naming the log."""
    log.write_text("")
    proc = ctx.Process(target=module_main, args=(module, argv, str(log)))
    proc.start()
    with open(log, errors="replace") as f:
        pending = ""
        while True:
            ended = not proc.is_alive()
            *lines, pending = (pending + f.read()).split("\n")
            for line in lines + ([pending] if ended else []):
                if show(line):
                    print("    " + line.strip()[-150:], flush=True)
            if ended:
                break
            time.sleep(0.2)
    proc.join()
    if proc.exitcode != 0:
        sys.exit(f"failed ({proc.exitcode}): python -m {module} {' '.join(argv)}\nsee {log}")


def train(model: str, seed: int, data: Path, out: Path, args: argparse.Namespace, gpu: bool,
          ctx: multiprocessing.context.BaseContext) -> Path:
    """One model trained by the unmodified open_clip_train.main in a ``ctx`` process; a finished run's
    checkpoint is reused."""
    name = f"{model}-s{seed}"
    ckpt = out / "runs" / name / "checkpoints" / f"epoch_{args.epochs}.pt"
    if ckpt.exists():
        say(f"{name}: checkpoint exists, skipping training")
        return ckpt
    argv = ["--model", model, "--train-data", str(data / "train" / "train.csv"), "--dataset-type", "csv",
            "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr), "--wd", "0.01",
            "--warmup", "10", "--lr-scheduler", "const-cooldown", "--epochs-cooldown", str(args.epochs),
            "--lr-cooldown-power", "1.0", "--workers", "2", "--seed", str(seed), "--log-every-n-steps", "10",
            "--precision", "amp" if gpu else "fp32", "--device", "cuda" if gpu else "cpu",
            "--logs", str(out / "runs"), "--name", name, "--resume", "latest"]
    if args.smoke and "-clip" in model:
        argv += ["--pretrained", str(random_start(model, seed, out))]
    if not args.smoke:
        # The pretrained MiniLM stays fixed (LiT-style; its projection and layer norms train): on
        # two CPU cores the budget goes to the image tower and ConLIP's heads. ConMLM still acts on
        # the image tower through the image CLS slot of its memory, which is the paper's mechanism.
        argv += ["--lock-text"]
    say(f"training {name}")
    run_module(ctx, "open_clip_train.main", argv, out / "runs" / f"{name}.stdout", show=lambda line: "Train Epoch" in line)
    return ckpt


def evaluate(models: Dict[str, Path], root: Path, out: Path, seed: int, split: str, gpu: bool,
             ctx: multiprocessing.context.BaseContext) -> Dict[str, dict]:
    """clip_benchmark's retrieval metrics on one split of each ``models`` config name -> checkpoint, in
    one clip_benchmark run in a ``ctx`` process; an earlier result is reused."""
    output = out / "runs" / f"{{model}}-s{seed}-{split}.json"  # clip_benchmark fills in {model}
    argv = ["eval", "--pretrained_model", *(f"{model},{ckpt}" for model, ckpt in models.items()),
            "--dataset", "flickr30k", "--dataset_root", str(root), "--task", "zeroshot_retrieval",
            "--recall_k", "1", "5", "10", "--batch_size", "128", "--num_workers", "2", "--skip_existing",
            "--output", str(output)]
    if not gpu:
        argv.append("--no_amp")
    run_module(ctx, "clip_benchmark.cli", argv, out / "runs" / f"eval-s{seed}-{split}.log")
    return {model: json.loads(Path(str(output).format(model=model)).read_text())["metrics"] for model in models}


def read_pairs(root: Path) -> List[Tuple[str, str]]:
    """(image file, caption) pairs of a clip_benchmark flickr30k-layout folder, one per T2I query."""
    annotation = root / EVAL_DATASETS["flickr30k"].annotation
    return [(name, caption) for name, captions in read_flickr_annotation(annotation) for caption in captions]


def embed(encoder: Encoder, root: Path, files: List[str], captions: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm embeddings of the images (files under ``root``) and captions, with the model's eval
    preprocessing, in batches of EMBED_BATCH; on a GPU under fp16 autocast, as clip_benchmark runs there."""
    images = [encoder.images(torch.stack([decode_image((root / f).read_bytes(), encoder.preprocess)
                                          for f in files[i:i + EMBED_BATCH]]))
              for i in range(0, len(files), EMBED_BATCH)]
    texts = [encoder.texts(captions[i:i + EMBED_BATCH]) for i in range(0, len(captions), EMBED_BATCH)]
    return torch.cat(images), torch.cat(texts)


def query_ranks(encoder: Encoder, root: Path) -> Dict[str, torch.Tensor]:
    """Per query, the rank of its first correct answer (0: top), as clip_benchmark scores them:
    T2I, one query per caption (its image); I2T, one query per image (any of its captions)."""
    pairs = read_pairs(root)
    files = sorted({f for f, _ in pairs})
    image_emb, text_emb = embed(encoder, root, files, [c for _, c in pairs])
    truth = torch.tensor([files.index(f) for f, _ in pairs])
    return dict(retrieval_ranks(text_emb @ image_emb.t(), truth), caption_image=truth)


def gallery(encoder: Encoder, root: Path, report: Path, queries: int = 6) -> None:
    """Paper Figure 5: evenly spaced text queries of the split and their top-5 images with scores."""
    pairs = read_pairs(root)
    files = sorted({f for f, _ in pairs})
    step = max(1, len(pairs) // queries)
    chosen = pairs[::step][:queries]
    image_emb, text_emb = embed(encoder, root, files, [c for _, c in chosen])
    scores, top = (text_emb @ image_emb.t()).topk(5, dim=1)
    demo_report.gallery(chosen, files, scores, top, root, report)


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
    if "," in str(out):
        sys.exit(f"--out {out}: clip_benchmark reads its checkpoints as MODEL,PATH pairs; choose a folder without a comma")
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
    ctx = workers()
    for seed in range(args.seeds):
        models = {family + suffix: train(family + suffix, seed, data, out, args, gpu, ctx) for _, suffix in VARIANTS}
        for (label, _), (model, ckpt) in zip(VARIANTS, models.items()):
            checkpoints[(label, seed)] = ckpt
            if seed == 0:
                curves[label] = loss_curves((out / "runs" / f"{model}-s{seed}" / "out.log").read_text())
        for split, folder in SPLITS:
            say(f"evaluating seed {seed} on {split}")
            metrics = evaluate(models, data / folder, out, seed, split, gpu, ctx)
            for (label, _), model in zip(VARIANTS, models):
                results[split][label].append(metrics[model])
        for (label, _), (model, ckpt) in zip(VARIANTS, models.items()):
            encoder = Encoder(model, str(ckpt))
            for split, folder in SPLITS:
                ranks[split][label].append(query_ranks(encoder, data / folder))
            if label == "ConLIP" and seed == 0:
                say("drawing the retrieval gallery")
                gallery(encoder, data / "test-cross-style", report)

    say("measuring the heads' attention to the instance slot (paper Table 2)")
    with open(out / "analysis.log", "w") as log, contextlib.redirect_stdout(log):
        attention(["--csv", str(data / "train" / "train.csv"), "--batches", "4", "--batch-size", "64",
                   "--out", str(report), "--checkpoint", f"ConLIP={family}:{checkpoints[('ConLIP', 0)]}",
                   "--checkpoint", f"Vanilla={family}-vanilla:{checkpoints[('Vanilla', 0)]}",
                   "--checkpoint",
                   f"CLIP+ConMLM+ConMIM={family}-clip+conmlm-conmim:{checkpoints[('CLIP+ConMLM+ConMIM', 0)]}"])
    say("drawing the loss curves")
    demo_report.plot_losses(curves, report / "losses.png")

    table = demo_report.summarise(results, ranks, args.seeds)
    chance = {split: 100 / len({f for f, _ in read_pairs(data / folder)}) for split, folder in SPLITS}
    table += demo_report.chance_and_rank_notes(chance, rank_check(results, ranks))
    title = (f"{family}; {args.seeds} seed(s), {args.epochs} epoch(s), {'GPU' if gpu else 'CPU'}, "
             f"{time.time() - started:.0f} s")
    text = demo_report.readme(title, table, (report / "table.md").read_text())
    (report / "README.md").write_text(text)
    (report / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + text)
    say(f"report written to {report}")
    say("indexing the cross-style test images with the ConLIP model (conlip-retrieval)")
    index = retrieval_index(family, checkpoints[("ConLIP", 0)], data / "test-cross-style", out)
    say(f"search the test images in a browser: conlip-retrieval serve --index {index}")

if __name__ == "__main__":
    main()
