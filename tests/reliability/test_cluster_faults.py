"""Faults a cluster brings: a pre-emption notice (SIGTERM, SIGUSR1) and a rank that dies under
``torchrun --max-restarts``. Unit tests of the pieces, then real runs (tests/reliability/cluster_faults.py)."""
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import cluster_faults
import gloo_preemption_worker
from conlip_plugin.reliability import preemption
from conlip_plugin.reliability.checkpoints import atomic_save


def test_notice_signals_default_none_and_a_wrong_name():
    assert preemption.notice_signals("") == []
    assert preemption.notice_signals("none") == []
    assert preemption.notice_signals(preemption.DEFAULT_SIGNALS) == [signal.SIGTERM, signal.SIGUSR1]
    assert preemption.notice_signals(" sigusr2 ") == [signal.SIGUSR2]
    with pytest.raises(ValueError, match="SIGTERMS, which are not signals here: .*'none'"):
        preemption.notice_signals("SIGTERMS")


def test_the_mid_epoch_checkpoint_is_latest_only_until_the_epoch_it_interrupted_is_saved():
    from open_clip_train.main import natural_key

    def latest(names):
        return sorted(names, key=natural_key)[-1]

    mid = Path(preemption.checkpoint_files("ck", 3, 3, False)[0]).name
    assert mid == "epoch_3_preempted.pt"
    assert latest(["epoch_2.pt", "epoch_3.pt", mid]) == mid
    assert latest(["epoch_3.pt", mid, "epoch_4.pt"]) == "epoch_4.pt"
    assert latest(["epoch_9.pt", mid, "epoch_10.pt"]) == "epoch_10.pt"
    assert [Path(p).name for p in preemption.checkpoint_files("ck", 3, 4, True)] == ["epoch_4.pt", "epoch_latest.pt"]


def test_superseded_mid_epoch_checkpoints_are_removed_and_the_newest_kept(tmp_path):
    for name in ("epoch_1_preempted.pt", "epoch_2_preempted.pt", "epoch_2.pt", "epoch_3_preempted.pt"):
        atomic_save({"epoch": 1}, str(tmp_path / name))
    (tmp_path / "epoch_3.pt").write_bytes(b"PK\x03\x04cut short")  # unreadable: supersedes nothing
    removed = preemption.remove_superseded(str(tmp_path))
    assert sorted(Path(p).name for p in removed) == ["epoch_1_preempted.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_2.pt", "epoch_2_preempted.pt", "epoch_3.pt",
                                                          "epoch_3_preempted.pt"]


def test_one_process_stops_before_the_first_step_after_the_signal():
    watch = preemption.PreemptionWatch(None, [signal.SIGUSR1])
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        watch.install()
        watch.before_step(None, (), {})
        assert watch.step_in_epoch == 1
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(preemption.Preempted):
            watch.before_step(None, (), {})
        assert watch.received == "SIGUSR1" and watch.step_in_epoch == 1 and watch.settle()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("noticed_at", [0, 4, 9])
def test_ranks_agree_one_step_late_on_the_same_step(noticed_at):
    """A notice on one rank only stops both before the same step (the next one), or, at the epoch's
    last step, both learn of it when the epoch is settled."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=gloo_preemption_worker.agree, args=(r, port, noticed_at, results)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        expected = (noticed_at + 1, None) if noticed_at < 9 else (None, True)
        assert results[0] == results[1] == expected


def _loader_worker(ready) -> None:
    preemption.IgnoringNotices([signal.SIGTERM], lambda worker_id: ready.set())(0)
    while True:
        time.sleep(0.05)


def test_loader_workers_outlive_a_scheduler_notice_but_not_their_process_shutdown():
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_loader_worker, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(30)
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # from another process: a scheduler
    worker.join(1.0)
    assert worker.is_alive()
    os.kill(worker.pid, signal.SIGTERM)  # from the training process, as multiprocessing's terminate()
    worker.join(10)
    assert worker.exitcode == 0


@pytest.fixture
def store_env(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")


def test_restarted_attempts_get_a_fresh_store_namespace_and_first_attempts_are_untouched(store_env, monkeypatch):
    from conlip_plugin.patches import elastic_restarts

    calls = []
    wrapped = elastic_restarts.fresh_namespace(lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    wrapped(backend="gloo", init_method="env://")
    assert calls[-1] == (("gloo", "env://"), {})
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    wrapped(backend="gloo", init_method="env://")
    (backend,), kwargs = calls[-1]
    assert backend == "gloo" and kwargs["rank"] == 0 and kwargs["world_size"] == 1
    store = kwargs["store"]
    assert isinstance(store, dist.PrefixStore)
    store.set("rank_1", "127.0.0.1:4000")
    assert store.underlying_store.check(["conlip/attempt_2/rank_1"])  # check, unlike get, does not wait
    assert store.underlying_store.get("conlip/attempt_2/rank_1") == b"127.0.0.1:4000"
    wrapped(backend="gloo", init_method="tcp://127.0.0.1:1")  # another method: unchanged
    assert calls[-1] == (("gloo", "tcp://127.0.0.1:1"), {})


@pytest.mark.slow
def test_a_notice_mid_epoch_checkpoints_exits_75_and_the_resumed_run_loses_no_step(tmp_path):
    """A real open_clip_train run (resampled short epochs) sent SIGTERM mid-epoch: exit 75, a
    checkpoint holding every step done; the resumed run repeats that epoch's steps and finishes."""
    result = cluster_faults.notices(tmp_path, kills=1, rng=random.Random(1))
    (record,) = result["records"]
    mid_epoch = record["steps_repeated"] > 0  # else the notice came at an epoch's last step
    assert record["exit"] == preemption.PREEMPTED_EXIT and record["checkpoint"].endswith("_preempted.pt") == mid_epoch
    assert record["steps_lost"] == 0
    assert result["finished"] and result["final_steps_as_expected"]
    assert not list((tmp_path / "logs" / "notice" / "checkpoints").glob("*_preempted.pt"))  # superseded
    log = (tmp_path / "run_0.out").read_text()
    assert "ConLIP: pre-emption notice (SIGTERM): stopped before step" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_notice_to_torchrun_stops_both_ranks_at_one_step_and_they_resume_identical(tmp_path):
    result = cluster_faults.notices(tmp_path, kills=1, rng=random.Random(2), port=_free_port(), world=2)
    (record,) = result["records"]
    assert record["checkpoint"].endswith("_preempted.pt") == (record["steps_repeated"] > 0)
    assert record["steps_lost"] == 0 and "stopped before step" in (tmp_path / "run_0.out").read_text()
    assert result["finished"] and result["final_steps_as_expected"] and result["ranks_identical"]


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_restarts_resumes_and_ends_with_identical_ranks(tmp_path):
    result = cluster_faults.dead_ranks(tmp_path, kills=1, rng=random.Random(3), port=_free_port())
    assert result["exit"] == 0 and result["restarts"] == 1 and result["finished"] and result["ranks_identical"]
    (record,) = result["records"]
    assert 0 <= record["steps_lost"] <= result["steps_per_epoch"]
