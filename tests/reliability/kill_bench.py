"""Kill a conlip-tiny run with SIGKILL N times at random moments, resume each time with --resume latest.

    python tests/reliability/kill_bench.py OUT_DIR [--kills 10] [--copies 8] [--epochs 6] [--resampled 80] [--seed 0]

(The figures of docs/reliability.md; run from a checkout with the plugin installed.)

Each kill picks a kind in turn, with a random moment: mid-step: uniform(0, one step) after a
random step number in [1, 1.5 epochs] of the process; mid-epoch: uniform(0, 1.5 epochs) after the
process's first logged step; during-save: uniform(0, 40 ms) after this process starts writing a
checkpoint (a fresh epoch_N.partial; a save here takes ~80-150 ms). Every resumed run goes
through tests/helpers/state_after_resume_main.py, which records the state right after the resume load;
it is compared bit for bit with the checkpoint resumed from.
Steps lost per kill = optimizer steps completed at the kill - steps in the checkpoint resumed from.
"""
import argparse
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
sys.path.insert(0, str(HELPERS))
import shapes_data  # noqa: E402
from conlip_plugin.reliability.checkpoints import checkpoint_problem  # noqa: E402

PYTHON = sys.executable
HELPER = str(HELPERS / "state_after_resume_main.py")
STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
BATCH = 8
STEP_S = 0.12  # one conlip-tiny step here (fp32, CPU, batch 8), measured


def bits_equal(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))
    if isinstance(b, dict):
        return a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(bits_equal(x, y) for x, y in zip(a, b))
    return a == b


def verify(state_file: Path, epoch: int) -> bool:
    """The resumed run started from epoch_{epoch}.pt (or afresh for 0) with exactly its state."""
    st = torch.load(state_file, weights_only=True)
    if epoch == 0:
        return st["resume"] is None
    if st["resume"] is None or Path(st["resume"]).name != f"epoch_{epoch}.pt":
        return False
    saved = torch.load(st["resume"], weights_only=True)
    return (bits_equal(st["model"], saved["state_dict"]) and bits_equal(st["optimizer"], saved["optimizer"])
            and all(any(k.startswith(p) for k in saved["state_dict"]) for p in ("momentum_visual.", "image_queue.ptr")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--resampled", type=int, default=0, help="--dataset-resampled --train-num-samples N on the shard")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    out = a.out.resolve()
    out.mkdir(parents=True)
    data = shapes_data.write(out / "data")
    args = ["--model", "conlip-tiny", "--batch-size", str(BATCH), "--epochs", str(a.epochs), "--lr", "5e-4",
            "--warmup", "2", "--precision", "fp32", "--device", "cpu", "--seed", "0", "--name", "run",
            "--log-every-n-steps", "1", "--save-frequency", "1", "--workers", "1"]
    if a.resampled:
        args += ["--train-data", str(data["shard"]), "--dataset-type", "webdataset", "--dataset-resampled",
                 "--train-num-samples", str(a.resampled)]
        steps_per_epoch = a.resampled // BATCH
    else:
        rows = list(csv.reader(open(data["csv"])))
        big = out / "data" / "big.csv"
        with open(big, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + rows[1:] * a.copies)
        args += ["--train-data", str(big), "--dataset-type", "csv", "--csv-separator", ",",
                 "--csv-img-key", "filepath", "--csv-caption-key", "title"]
        steps_per_epoch = (len(rows) - 1) * a.copies // BATCH
    ckpts = out / "logs" / "run" / "checkpoints"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    kinds = ("mid-step", "mid-epoch", "during-save")
    records, resumes_ok = [], 0
    for attempt in range(a.kills + 1):
        state = out / f"state_{attempt}.pt"
        log = out / f"proc_{attempt}.out"
        resume = attempt > 0
        cmd = [PYTHON, HELPER, *args, "--resume", "latest"] if resume else [PYTHON, "-m", "open_clip_train.main", *args]
        with open(log, "w") as fh:
            started = time.time()
            proc = subprocess.Popen(cmd, cwd=out, env=dict(env, STATE_AFTER_RESUME=str(state)), stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)

        def steps_logged() -> list:
            return STEP.findall(log.read_text(errors="replace"))

        def fresh_partials() -> list:
            """Checkpoints this process is writing now (a partial left by an earlier kill is older)."""
            return sorted(p.name for p in ckpts.glob("*.partial") if p.stat().st_mtime >= started)

        def wait(cond) -> bool:
            while not cond():
                if proc.poll() is not None:
                    return False
                time.sleep(0.001)
            return True

        if attempt == a.kills:
            rc = proc.wait()
            finished = rc == 0 and checkpoint_problem(ckpts / f"epoch_{a.epochs}.pt") is None
            break
        kind = kinds[attempt % 3]
        alive = wait(lambda: len(steps_logged()) > 0)
        if kind == "mid-step":
            target = rng.randint(1, steps_per_epoch * 3 // 2)
            alive = alive and wait(lambda: len(steps_logged()) >= target)
            time.sleep(rng.uniform(0, STEP_S))
        elif kind == "mid-epoch":
            time.sleep(rng.uniform(0, steps_per_epoch * 3 // 2 * STEP_S))
        else:
            alive = alive and wait(lambda: bool(fresh_partials()))
            time.sleep(rng.uniform(0, 0.04))
        if not alive:
            raise SystemExit(f"run ended before kill {attempt}: see {log}")
        partial_at_kill = fresh_partials()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        steps = steps_logged()
        done = 0
        if steps:
            epoch, samples, _ = steps[-1]
            done = int(epoch) * steps_per_epoch + int(samples) // BATCH
        cut_short = [p.name for p in ckpts.glob("*.pt") if checkpoint_problem(p) is not None]
        readable = sorted((int(p.stem.split("_")[1]) for p in ckpts.glob("epoch_*.pt") if checkpoint_problem(p) is None))
        newest = readable[-1] if readable else 0
        records.append({"kill": attempt + 1, "kind": kind, "partial_at_kill": partial_at_kill,
                        "steps_done": done, "resume_from_epoch": newest, "steps_lost": done - newest * steps_per_epoch,
                        "pt_cut_short": cut_short})
        if resume:
            records[-2]["resume_bitwise"] = verify(state, records[-2]["resume_from_epoch"])
            resumes_ok += records[-2]["resume_bitwise"]
        print(json.dumps(records[-1]), flush=True)
    records[-1]["resume_bitwise"] = verify(out / f"state_{a.kills}.pt", records[-1]["resume_from_epoch"])
    resumes_ok += records[-1]["resume_bitwise"]
    lost = [r["steps_lost"] for r in records]
    summary = {"steps_per_epoch": steps_per_epoch, "epochs": a.epochs, "kills": len(records),
               "kinds": {k: sum(r["kind"] == k for r in records) for k in kinds},
               "kills_while_a_checkpoint_was_being_written": sum(bool(r["partial_at_kill"]) for r in records),
               "resumes_bitwise_equal": resumes_ok, "final_run_finished": finished,
               "pt_files_cut_short_ever": sum(bool(r["pt_cut_short"]) for r in records),
               "steps_lost": lost, "steps_lost_mean": sum(lost) / len(lost), "steps_lost_max": max(lost)}
    print(json.dumps(summary, indent=1))
    (out / "summary.json").write_text(json.dumps({"records": records, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
