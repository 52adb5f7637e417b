"""Beyond one machine: two torchrun "nodes" (c10d rendezvous on 127.0.0.1, gloo) train, save and
resume with identical queues, pointers and momentum encoders on every rank; the SLURM recipe's
command line, through stub srun/scontrol."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (Path(__file__).resolve().parents[1] / "helpers" / "dump_queues_main.py")
SBATCH = ROOT / "scripts" / "recipes" / "pretrain.sbatch"

pytestmark = pytest.mark.slow


def _two_nodes(args: list, cwd: Path, port: int) -> None:
    """Both nodes at once, as two torchrun launchers meeting at one c10d rendezvous."""
    launcher = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "conlip-test"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    nodes = [subprocess.Popen([*launcher, str(SCRIPT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]


def _ranks(cwd: Path) -> list:
    return [torch.load(cwd / f"queues_rank{r}.pt", weights_only=True) for r in (0, 1)]


def _assert_identical(a: dict, b: dict) -> None:
    assert int(a["ptr"]) == int(b["ptr"])
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    for tower in ("momentum_visual", "momentum_text"):
        assert a[tower].keys() == b[tower].keys()
        assert all(torch.equal(a[tower][k], b[tower][k]) for k in a[tower]), tower


def test_two_nodes_train_save_and_resume_with_identical_state(caption_data, tmp_path):
    args = ["--model", "conlip-tiny", "--train-data", str(caption_data["csv"]), "--dataset-type", "csv",
            "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "8",
            "--lr", "5e-4", "--precision", "fp32", "--device", "cpu", "--workers", "1", "--name", "nodes",
            "--seed", "0", "--save-frequency", "1"]
    _two_nodes([*args, "--epochs", "1"], tmp_path, 29571)
    first = _ranks(tmp_path)
    _assert_identical(*first)
    # 30 rows over 2 ranks x batch 8, drop_last: one step of a global batch of 16 keys per epoch.
    assert int(first[0]["ptr"]) == 16
    saved = torch.load(tmp_path / "logs" / "nodes" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    assert torch.equal(saved["module.image_queue.features"], first[0]["image"])

    _two_nodes([*args, "--epochs", "2", "--resume", "latest"], tmp_path, 29572)
    second = _ranks(tmp_path)
    _assert_identical(*second)
    assert int(second[0]["ptr"]) == 32
    before, after = saved["module.image_queue.features"], second[0]["image"]
    assert torch.equal(after[:16], before[:16]) and torch.equal(after[32:], before[32:])
    assert not torch.equal(after[16:32], before[16:32])
    assert "(epoch 1)" in (tmp_path / "logs" / "nodes" / "out.log").read_text()


@pytest.fixture
def stub_slurm(tmp_path) -> dict:
    """``srun`` prints its environment's rendezvous and its command; ``scontrol`` names 20,000 hosts,
    more than a pipe holds, so a recipe that stops reading after the first one fails every time."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\necho "MASTER=$MASTER_ADDR:$MASTER_PORT"\n'
                                  'printf "%s\\n" "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-%s\\n" a b {1..20000}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[a-b]",
                SLURM_SUBMIT_DIR=str(ROOT), DATA="/data/cc5m/{00000..00529}.tar", NUM_SAMPLES="5300000")


def test_sbatch_recipe_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


@pytest.mark.parametrize("nodes,tasks,per_gpu", [(1, 8, 512), (2, 4, 512), (1, 4, 1024)])
def test_sbatch_recipe_runs_open_clip_under_srun_with_the_paper_schedule(stub_slurm, nodes, tasks, per_gpu):
    env = dict(stub_slurm, SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(tasks),
               SLURM_NTASKS=str(nodes * tasks))
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "MASTER=gpu-a:29500"
    argv = lines[1:]
    flag = lambda name: argv[argv.index(name) + 1]
    assert argv[argv.index("-m") + 1] == "open_clip_train.main"
    assert flag("--model") == "conlip-vit-b16-bert" and flag("--batch-size") == str(per_gpu)
    assert flag("--train-data") == env["DATA"] and flag("--train-num-samples") == "5300000"
    # Paper Table 6: 30 epochs, 10% warm-up in steps at a global batch of 4,096, linear decay after it.
    steps_per_epoch = 5300000 // 4096
    assert flag("--warmup") == str(steps_per_epoch * 30 // 10) and flag("--lr-scheduler") == "const-cooldown"
    assert flag("--precision") == "amp" and flag("--resume") == "latest"
    assert "--image-mean" not in argv


@pytest.mark.parametrize("exits,calls,requeued,status", [
    ("75", 1, True, 0),  # a notice: the checkpoint is written, the job goes back to the queue
    ("1 0", 2, False, 0),  # a task died: the step runs again and finishes
    ("1 1 1 1", 4, False, 1),  # dies every time: 3 restarts, then the failure is the job's
])
def test_sbatch_recipe_requeues_after_a_notice_and_restarts_a_failed_step(stub_slurm, tmp_path, exits, calls,
                                                                          requeued, status):
    count, requeue = tmp_path / "srun_calls", tmp_path / "requeued"
    (tmp_path / "bin" / "srun").write_text(
        f'#!/usr/bin/env bash\necho x >> {count}\nexits=($SRUN_EXITS)\nexit "${{exits[$(( $(wc -l < {count}) - 1 ))]}}"\n')
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(scontrol.read_text() + f'[ "$1" = requeue ] && echo "$2" > {requeue}\nexit 0\n')
    env = dict(stub_slurm, SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="8", SLURM_NTASKS="8", SLURM_JOB_ID="4242",
               SRUN_EXITS=exits)
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert len(count.read_text().splitlines()) == calls
    assert (requeue.read_text().strip() == "4242") if requeued else not requeue.exists()
