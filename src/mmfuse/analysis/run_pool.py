"""Independent trainings (the demo's five runs, a bench's methods x seeds) spread over processes.

Why processes of one thread each, not one process with a thread per core: the small models these
commands train spend their time in short ops, and torch's threads wait for each other at the end of
every op. On an idle 2-core machine two one-thread runs side by side finish sooner than the same runs
one after the other on two threads; beside a CPU-bound competitor the gap is large (a run on two
threads was 14x slower, each one-thread process about 1.5x; benchmarks/RESULTS.md, "Busy CPU").
And a run's numbers no longer depend on how many cores the machine had or how busy it was: every
run trains on one thread (unless ``trainer.threads`` says otherwise), in a pool or not.

The workers are forked after the data is prepared, so they share it (copy on write) instead of
each importing torch and decoding the files again. They are forked before any parallel work, with
torch on one thread, so no OpenMP thread pool exists to be lost in the fork. Only results travel
back (small dataclasses); a failed run's error is raised here, naming the run, and the other
workers are stopped. Where fork is unavailable (macOS, Windows) or a run uses a GPU or several
devices, the runs go one after the other in this process.
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from mmfuse.config import ExperimentConfig
from mmfuse.core.errors import MMFuseError
from mmfuse.core.threads import plan_processes, usable_cores
from mmfuse.engine.data import PreparedData

T = TypeVar("T")
R = TypeVar("R")

RUN_THREADS = 1
"""Intra-op threads of each run (``trainer.threads`` unset): see the module docstring."""


def pool_jobs(config: ExperimentConfig, runs: int, jobs: int | None = None) -> int:
    """Processes for ``runs`` trainings of ``config``: ``jobs`` if given, else one per usable core
    (``plan_processes``; a run with DataLoader workers counts them as cores); 1 where the runs need a
    GPU, several devices or a start method without fork."""
    trainer = config.trainer
    if jobs is not None:
        return max(1, min(jobs, runs))
    if "fork" not in multiprocessing.get_all_start_methods() or trainer.devices not in (1, "1"):
        return 1
    if trainer.accelerator not in ("cpu", "auto"):
        return 1
    if trainer.accelerator == "auto":
        import torch

        if torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            return 1
    # DataLoader workers keep cores of their own (data.num_workers): a run needs its threads + those
    return plan_processes(usable_cores(), runs, (trainer.threads or RUN_THREADS) + config.data.num_workers)


def one_thread_runs(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with ``trainer.threads`` set to ``RUN_THREADS`` unless the user set it."""
    if config.trainer.threads is not None:
        return config
    return config.model_copy(update={"trainer": config.trainer.model_copy(update={"threads": RUN_THREADS})})


def run_pool(data: PreparedData, tasks: Sequence[T], work: Callable[[PreparedData, T], R], jobs: int,
             names: Sequence[str] | None = None) -> Iterator[tuple[int, R]]:
    """Yields (index, ``work(data, task)``) as each task finishes (in order of completion when
    ``jobs`` > 1). ``work`` must return plain data: it crosses a process boundary."""
    if jobs <= 1 or len(tasks) <= 1:
        for index, task in enumerate(tasks):
            yield index, work(data, task)
        return
    yield from _forked(data, tasks, work, jobs, list(names or [str(i) for i in range(len(tasks))]))


def _forked(data: PreparedData, tasks: Sequence[T], work: Callable[[PreparedData, T], R], jobs: int,
            names: list[str]) -> Iterator[tuple[int, R]]:
    import torch

    context = multiprocessing.get_context("fork")
    todo: Any = context.SimpleQueue()
    done: Any = context.Queue()
    for index in range(len(tasks)):
        todo.put(index)
    for _ in range(jobs):
        todo.put(None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children start with one thread, before any op of theirs
    # Not daemonic: a run may start DataLoader workers of its own. The finally below stops them all.
    workers = [context.Process(target=_worker, args=(data, tasks, work, todo, done), name=f"mmfuse-run-{i}")
               for i in range(jobs)]
    try:
        for worker in workers:
            worker.start()
        torch.set_num_threads(threads)
        received = 0
        while received < len(tasks):
            try:
                kind, index, payload = done.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise MMFuseError(f"a training process ended with exit code {dead[0].exitcode} (killed for "
                                      "memory?); run again with --jobs 1 to train in this process") from None
                continue
            received += 1
            if kind == "user":
                raise MMFuseError(payload)
            if kind == "error":
                raise MMFuseError(f"run '{names[index]}' failed: {payload}")
            yield index, payload
    finally:
        torch.set_num_threads(threads)
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=5)
        done.close()


def _worker(data: PreparedData, tasks: Sequence[T], work: Callable[[PreparedData, T], R], todo: Any,
            done: Any) -> None:
    import torch

    torch.set_num_threads(1)
    while (index := todo.get()) is not None:
        try:
            done.put(("ok", index, work(data, tasks[index])))
        except MMFuseError as exc:  # a user's error: its one line, as in one process
            done.put(("user", index, str(exc)))
        except Exception as exc:  # any failure is reported to the parent, which raises it
            done.put(("error", index, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))
