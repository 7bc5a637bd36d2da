"""The thread policy (mmfuse.core.threads): what it picks for given cores, quotas and load, what it
reads from cgroup files and /proc, and that a running command follows a competitor's arrival."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mmfuse.core.errors import ConfigError
from mmfuse.core.threads import (
    ThreadWatch,
    busy_elsewhere,
    cgroup_quota,
    parse_cfs,
    parse_cpu_max,
    plan_processes,
    plan_threads,
    thread_policy,
    usable_cores,
    whole_cores,
)

TWO_CORES = whole_cores(usable_cores()) >= 2


@pytest.mark.parametrize(("usable", "busy", "workers", "wanted"), [
    (2, 0.0, 0, 2),    # idle 2-core box: both cores
    (2, 1.0, 0, 1),    # one CPU-bound competitor: the free core only
    (2, 0.3, 0, 2),    # a background daemon's 0.3 cores do not cost a thread
    (2, 0.6, 0, 1),
    (2, 5.0, 0, 1),    # overloaded: still one thread
    (8, 3.2, 0, 5),
    (1.5, 0.0, 0, 1),  # cgroup quota of 1.5 cores: a second thread would wait for quota
    (16, 0.0, 4, 12),  # each DataLoader worker keeps a core
    (64, 0.0, 0, 64),
])
def test_threads_for_cores_load_and_workers(usable: float, busy: float, workers: int, wanted: int) -> None:
    assert plan_threads(usable, busy, loader_workers=workers) == wanted


def test_a_requested_count_wins() -> None:
    assert plan_threads(2, 1.9, requested=6) == 6


@pytest.mark.parametrize(("usable", "runs", "threads", "wanted"), [
    (2, 5, 1, 2), (1.5, 5, 1, 1), (8, 3, 1, 3), (8, 10, 2, 4), (1, 10, 1, 1), (2, 1, 1, 1)])
def test_processes_for_independent_runs(usable: float, runs: int, threads: int, wanted: int) -> None:
    assert plan_processes(usable, runs, threads) == wanted


def test_quota_files_parse() -> None:
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("200000", "100000") == 2.0
    assert usable_cores(affinity=8, quota=2.5) == 2.5 and usable_cores(affinity=2, quota=4.0) == 2.0


def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path: Path) -> None:
    (tmp_path / "job" / "step").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "job" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "job" / "step" / "cpu.max").write_text("50000 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    assert cgroup_quota(tmp_path, proc) == 0.5
    proc.write_text("0::/job\n")
    assert cgroup_quota(tmp_path, proc) == 3.0
    proc.write_text("0::/\n")
    assert cgroup_quota(tmp_path, proc) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    folder = tmp_path / "cpu,cpuacct" / "slurm" / "job_7"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("150000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/slurm/job_7\n3:cpu,cpuacct:/slurm/job_7\n")
    assert cgroup_quota(tmp_path, proc) == 1.5
    assert cgroup_quota(tmp_path, tmp_path / "absent") is None


class _Spinner:
    """A CPU-bound competitor in a session of its own, as another job is, and not a child of this
    process (the policy counts its own children as its own work): started by a shell that exits."""

    def __init__(self) -> None:
        started = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                                 capture_output=True, text=True, check=True, start_new_session=True)
        self.pid = int(started.stdout.strip())

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _spin_here(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


@pytest.mark.skipif(not TWO_CORES, reason="needs two usable cores")
def test_busy_elsewhere_sees_other_processes_not_this_one() -> None:
    competitor = _Spinner()
    try:
        time.sleep(0.3)
        assert busy_elsewhere(0.5) >= 0.6
    finally:
        competitor.stop()
    stop = threading.Event()
    spinning = threading.Thread(target=_spin_here, args=(stop,))
    spinning.start()
    try:
        assert busy_elsewhere(0.5) <= 0.5, "this process's own work is not someone else's"
    finally:
        stop.set()
        spinning.join()


@pytest.mark.skipif(not TWO_CORES, reason="needs two usable cores")
def test_watch_drops_to_one_thread_when_a_competitor_arrives_and_returns_after() -> None:
    previous = torch.get_num_threads()
    watch = ThreadWatch(usable=2.0, threads=2, interval=0.3).start()
    torch.set_num_threads(2)
    try:
        competitor = _Spinner()
        try:
            deadline = time.monotonic() + 8
            while watch.threads != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
                watch.apply()  # as the training loop does between steps
            assert watch.threads == 1 and torch.get_num_threads() == 1
        finally:
            competitor.stop()
        deadline = time.monotonic() + 8
        while watch.threads != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            watch.apply()
        assert watch.threads == 2 and torch.get_num_threads() == 2
        assert [(before, after) for _, before, after, _ in watch.changes] == [(2, 1), (1, 2)]
        assert watch.changes[0][3] >= 0.6, "the busy cores that made it change are recorded"
    finally:
        watch.stop()
        torch.set_num_threads(previous)


def test_policy_blocks_set_and_restore_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMFUSE_THREADS", raising=False)
    before = torch.get_num_threads()
    with thread_policy(3) as watch:
        assert watch is None and torch.get_num_threads() == 3, "a user's count is kept and never watched"
    assert torch.get_num_threads() == before
    with thread_policy() as outer:
        assert outer is not None and 1 <= torch.get_num_threads() <= whole_cores(usable_cores())
        with thread_policy() as inner:
            assert inner is outer, "a nested block reuses the outer look"
    assert torch.get_num_threads() == before
    monkeypatch.setenv("MMFUSE_THREADS", "1")
    with thread_policy() as watch:
        assert watch is None and torch.get_num_threads() == 1
    monkeypatch.setenv("MMFUSE_THREADS", "two")
    with pytest.raises(ConfigError, match="MMFUSE_THREADS='two': expected a whole number"), thread_policy():
        pass
