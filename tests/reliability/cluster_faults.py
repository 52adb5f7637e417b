"""Faults a cluster brings, on real runs of open_clip_train (conlip-tiny, CPU, gloo): a rank killed
under ``torchrun --max-restarts``, and a pre-emption notice. Used by tests/reliability/test_cluster_faults.py
(one fault of each kind) and, as a script, for the figures of docs/reliability.md:

    python tests/reliability/cluster_faults.py OUT --mode dead-rank --kills 5 [--seed 0]
    python tests/reliability/cluster_faults.py OUT --mode notice --kills 5 [--seed 0]

dead-rank: one torchrun (2 ranks, ``--max-restarts KILLS``) whose ranks are killed with SIGKILL
in turn, each at a random step after the group's (re)start; steps lost per kill = optimizer steps
done at the kill - steps in the checkpoint the restart resumed from.
notice: KILLS runs sent SIGTERM at a random step, each resumed with ``--resume latest``; steps
lost = steps done at the notice - steps in the checkpoint written; steps repeated = the steps of
the interrupted epoch that the resumed run trains again.
Both end with every rank's momentum encoders, queues and pointers compared.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
sys.path.insert(0, str(HELPERS))
import shapes_data  # noqa: E402

PYTHON = sys.executable
DUMP = str(HELPERS / "dump_queues_main.py")
STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
STARTED = re.compile(r"Found latest resume checkpoint at (\S+)\.\n|No latest resume checkpoint found in \S+\.\n")
PER_RANK_BATCH = 4
PREEMPTED_EXIT = 75


def train_args(shard: Path, name: str, epochs: int, samples: int) -> List[str]:
    return ["--model", "conlip-tiny", "--train-data", str(shard), "--dataset-type", "webdataset",
            "--dataset-resampled", "--train-num-samples", str(samples), "--batch-size", str(PER_RANK_BATCH),
            "--epochs", str(epochs), "--lr", "5e-4", "--warmup", "2", "--precision", "fp32", "--device", "cpu",
            "--seed", "0", "--name", name, "--log-every-n-steps", "1", "--save-frequency", "1", "--workers", "1",
            "--resume", "latest"]


def torchrun(port: int, restarts: int) -> List[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", str(restarts)]


class Run:
    """One launched command, its log, and what the log says of its steps."""

    def __init__(self, cmd: List[str], cwd: Path, log: Path, world: int):
        self.log, self.world = log, world
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def steps(self, samples_per_epoch: int) -> List[int]:
        """Optimizer steps done, as each logged line counts them (every step is logged)."""
        per_epoch = samples_per_epoch // (PER_RANK_BATCH * self.world)
        return [int(e) * per_epoch + int(s) // (PER_RANK_BATCH * self.world) for e, s, _ in STEP.findall(self.text())]

    def wait_until(self, cond: Callable[[], bool], timeout: float = 300) -> None:
        end = time.time() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {self.proc.returncode}) before it was due to: see {self.log}")
            if time.time() > end:
                raise RuntimeError(f"timed out waiting on the run: see {self.log}")
            time.sleep(0.02)

    def finish(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)


def worker_pid(launcher: int, local_rank: int) -> int:
    """The pid of torchrun's worker of that local rank (read from each child's environment)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return int(pid)
    raise RuntimeError(f"torchrun {launcher} has no worker of local rank {local_rank} (children {children})")


def optimizer_steps(checkpoint: Path) -> int:
    state = torch.load(checkpoint, weights_only=True)["optimizer"]["state"]
    counts = {int(s["step"]) for s in state.values()}
    assert len(counts) == 1, counts
    return counts.pop()


def ranks_identical(cwd: Path) -> bool:
    """Every rank's queues, pointers and momentum encoders, as dump_queues_main.py saved them, agree."""
    saved = [torch.load(cwd / f"queues_rank{r}.pt", weights_only=True) for r in (0, 1)]

    def same(a, b) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b)

    return same(saved[0], saved[1])


def dead_ranks(out: Path, kills: int, rng: random.Random, port: int = 29571) -> Dict[str, object]:
    """One torchrun whose ranks are killed ``kills`` times; it must restart and finish."""
    data = shapes_data.write(out / "data")
    samples, epochs = 64, 2 * kills + 2  # 8 steps an epoch on 2 ranks
    per_epoch = samples // (2 * PER_RANK_BATCH)
    run = Run([*torchrun(port, kills), DUMP, *train_args(data["shard"], "dead", epochs, samples)], out,
              out / "torchrun.out", world=2)
    records = []
    run.wait_until(lambda: bool(STARTED.findall(run.text())))  # the first start's choice
    for kill in range(kills):
        starts, base = len(STARTED.findall(run.text())), len(run.steps(samples))
        target = base + rng.randint(1, per_epoch * 3 // 2)  # steps of this (re)start of the group
        run.wait_until(lambda: len(run.steps(samples)) >= target)
        time.sleep(rng.uniform(0, 0.15))
        rank = kill % 2
        os.kill(worker_pid(run.proc.pid, rank), signal.SIGKILL)
        done = run.steps(samples)[-1]
        run.wait_until(lambda: len(STARTED.findall(run.text())) > starts)  # the restart's choice
        chosen = STARTED.findall(run.text())[starts]
        resumed = optimizer_steps(out / chosen) if chosen else 0
        records.append({"kill": kill + 1, "rank": rank, "steps_done": done, "resumed_from": Path(chosen).name or None,
                        "resumed_from_step": resumed, "steps_lost": done - resumed})
    rc = run.finish()
    final = out / "logs" / "dead" / "checkpoints" / f"epoch_{epochs}.pt"
    return {"mode": "dead-rank", "exit": rc, "kills": len(records), "restarts": len(STARTED.findall(run.text())) - 1,
            "finished": rc == 0 and final.is_file(), "ranks_identical": rc == 0 and ranks_identical(out),
            "steps_per_epoch": per_epoch, "records": records,
            "steps_lost": [r["steps_lost"] for r in records]}


def notices(out: Path, kills: int, rng: random.Random, port: int = 29572,
            world: int = 1) -> Dict[str, object]:
    """``kills`` runs ended by SIGTERM at a random step, each resumed; the last one finishes."""
    data = shapes_data.write(out / "data")
    samples, epochs = 40 * world, kills + 2  # 10 steps an epoch
    per_epoch = samples // (world * PER_RANK_BATCH)
    args = train_args(data["shard"], "notice", epochs, samples)
    launch = [*torchrun(port, 0), DUMP] if world > 1 else [PYTHON, DUMP]
    checkpoints = out / "logs" / "notice" / "checkpoints"
    records = []
    for attempt in range(kills + 1):
        run = Run([*launch, *args], out, out / f"run_{attempt}.out", world)
        if attempt == kills:
            rc = run.finish()
            break
        run.wait_until(lambda: bool(run.steps(samples)))
        run.wait_until(lambda: bool(STARTED.findall(run.text())))
        chosen = STARTED.findall(run.text())[0]
        resumed = optimizer_steps(out / chosen) if chosen else 0
        target = rng.randint(1, per_epoch * 2)
        run.wait_until(lambda: len(run.steps(samples)) >= target)
        os.kill(run.proc.pid, signal.SIGTERM)
        exit_code = run.finish()
        done = resumed + len(run.steps(samples))  # optimizer steps, counting those a replay repeats
        in_epoch = int(STEP.findall(run.text())[-1][1]) // (PER_RANK_BATCH * world)
        written = sorted(checkpoints.glob("epoch_*.pt"), key=lambda p: p.stat().st_mtime)  # the stop's is newest
        saved = optimizer_steps(written[-1]) if written else None
        records.append({"notice": attempt + 1, "exit": exit_code, "steps_done_at_notice": done,
                        "checkpoint": written[-1].name if written else None, "steps_in_checkpoint": saved,
                        "steps_lost": None if saved is None else done - saved,
                        "steps_repeated": in_epoch % per_epoch})
    final = checkpoints / f"epoch_{epochs}.pt"
    total = optimizer_steps(final) if final.is_file() else None
    repeated = sum(r["steps_repeated"] for r in records)
    return {"mode": "notice", "world": world, "exit": rc, "notices": len(records),
            "exits": [r["exit"] for r in records], "finished": rc == 0 and final.is_file(),
            "ranks_identical": world == 1 or (rc == 0 and ranks_identical(out)),
            "steps_per_epoch": per_epoch, "final_optimizer_steps": total, "steps_repeated_total": repeated,
            "final_steps_as_expected": total == epochs * per_epoch + repeated,
            "records": records, "steps_lost": [r["steps_lost"] for r in records]}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--mode", choices=("dead-rank", "notice"), required=True)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--world", type=int, default=1, choices=(1, 2), help="notice mode: ranks")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True)
    rng = random.Random(a.seed)
    result = dead_ranks(a.out, a.kills, rng) if a.mode == "dead-rank" else notices(a.out, a.kills, rng, world=a.world)
    print(json.dumps(result, indent=1))
    (a.out / "summary.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
