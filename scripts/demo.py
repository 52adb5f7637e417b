"""The main job on its embedded default: train CL, Vanilla and ConLIP (``conlip-tiny``) on the
coloured-shapes set through the unmodified ``open_clip_train.main``, then report each loss term.

    python scripts/demo.py [--out runs/demo] [--epochs 8] [--smoke]
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_data  # noqa: E402

VARIANTS = (("CL", "conlip-tiny-cl"), ("Vanilla", "conlip-tiny-vanilla"), ("ConLIP", "conlip-tiny"))


def epoch_means(log: str) -> Dict[str, Dict[int, float]]:
    """Per loss term, the mean of its logged per-step values in each epoch."""
    per: Dict[str, Dict[int, List[float]]] = {}
    for line in log.splitlines():
        m = re.search(r"Train Epoch: (\d+)", line)
        if not m:
            continue
        for key, val in re.findall(r"(\w+_loss|Loss): ([-\d.e+]+) \(", line):
            per.setdefault(key.lower(), {}).setdefault(int(m.group(1)), []).append(float(val))
    return {k: {e: mean(v) for e, v in ep.items()} for k, ep in per.items()}


def train(model: str, data: dict, out: Path, epochs: int, seed: int) -> Path:
    name = f"{model}-s{seed}"
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", model, "--train-data", str(data["csv"]),
           "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath",
           "--csv-caption-key", "title", "--batch-size", "10", "--epochs", str(epochs), "--lr", "5e-4",
           "--wd", "0.01", "--warmup", "3", "--precision", "fp32", "--workers", "1", "--seed", str(seed),
           "--log-every-n-steps", "1", "--logs", str(out), "--name", name]
    log = out / name / "out.log"
    if log.exists():
        log.unlink()
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training {model} failed:\n{proc.stderr[-4000:]}")
    print(f"  trained {model} (seed {seed}) in {time.time() - started:.0f}s; log: {log}", flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2 epochs, for CI")
    args = parser.parse_args()
    epochs = 2 if args.smoke else args.epochs
    args.out.mkdir(parents=True, exist_ok=True)
    data = shapes_data.write(args.out / "data")
    print(f"data: {data['count']} image-caption pairs in {data['root']}", flush=True)

    rows = []
    for label, model in VARIANTS:
        terms = epoch_means(train(model, data, args.out, epochs, args.seed).read_text())
        for term, per_epoch in sorted(terms.items()):
            first, last = per_epoch[min(per_epoch)], per_epoch[max(per_epoch)]
            rows.append((label, term, first, last))
    print(f"\nloss per term, mean over the first and the last of {epochs} epochs:")
    print(f"{'model':<8} {'term':<12} {'first':>9} {'last':>9}  change")
    for label, term, first, last in rows:
        print(f"{label:<8} {term:<12} {first:>9.4f} {last:>9.4f}  {100 * (last - first) / first:+.1f}%")


if __name__ == "__main__":
    main()
