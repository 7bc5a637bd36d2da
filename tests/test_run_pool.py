"""Independent runs on several processes (mmfuse.analysis.run_pool): the same results as one after
the other, errors raised here naming the run, a killed worker reported, never a hang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmfuse.analysis.demo import run_demo
from mmfuse.analysis.run_pool import pool_jobs, run_pool
from mmfuse.config import load_config
from mmfuse.config.presets import preset_path
from mmfuse.core.errors import ConfigError, MMFuseError
from mmfuse.core.threads import usable_cores, whole_cores


def _square(data: object, task: int) -> int:
    return task * task


def _fails_on_two(data: object, task: int) -> int:
    if task == 2:
        raise ValueError("two is not allowed")
    if task == 3:
        raise ConfigError("encoders.image.name: no such encoder")
    return task


def _dies(data: object, task: int) -> int:
    if task == 1:
        os._exit(9)
    return task


def test_every_task_comes_back_once_with_its_index() -> None:
    got = dict(run_pool(None, list(range(7)), _square, jobs=2))  # type: ignore[arg-type]
    assert got == {i: i * i for i in range(7)}


def test_a_failed_run_is_raised_naming_it() -> None:
    with pytest.raises(MMFuseError, match=r"run 'c' failed: ValueError: two is not allowed"):
        dict(run_pool(None, [0, 1, 2], _fails_on_two, jobs=2, names=["a", "b", "c"]))  # type: ignore[arg-type]
    with pytest.raises(MMFuseError, match=r"^encoders.image.name: no such encoder$"):  # a user's error: its line
        dict(run_pool(None, [0, 3], _fails_on_two, jobs=2))  # type: ignore[arg-type]  # two: one runs in place


def test_a_killed_worker_is_reported_not_waited_for() -> None:
    with pytest.raises(MMFuseError, match="a training process ended with exit code 9"):
        dict(run_pool(None, [0, 1, 2, 3], _dies, jobs=2))  # type: ignore[arg-type]


def test_jobs_follow_cores_and_devices() -> None:
    config = load_config(preset_path("demo"), [])
    assert pool_jobs(config, 5, jobs=3) == 3 and pool_jobs(config, 2, jobs=8) == 2
    gpu = load_config(preset_path("demo"), ["trainer.accelerator=gpu"])
    assert pool_jobs(gpu, 5) == 1, "processes would queue for one GPU"
    loaders = load_config(preset_path("demo"), ["data.num_workers=2"])
    assert pool_jobs(loaders, 5) == max(1, min(5, whole_cores(usable_cores()) // 3)), "a run's loader workers are cores"


def test_demo_on_two_processes_gives_what_it_gives_in_one(tmp_path: Path) -> None:
    """Every run trains on one thread wherever it runs, so the pool changes only the wall time."""
    small = ["data.synthetic.n_samples=160", "trainer.max_epochs=2", "trainer.contribution_check=false"]
    pooled = run_demo(tmp_path / "pooled", small, jobs=2)
    alone = run_demo(tmp_path / "alone", small, jobs=1)
    assert [r.method for r in pooled] == ["audio only", "image only", "text only", "concat", "late"]
    assert [(r.method, r.accuracy, r.macro_f1, r.params) for r in pooled] == \
        [(r.method, r.accuracy, r.macro_f1, r.params) for r in alone]
    assert (tmp_path / "pooled" / "results.csv").read_text().splitlines()[1].startswith("audio only,audio,")
    assert (tmp_path / "pooled" / "runs" / "concat" / "model").is_dir()
