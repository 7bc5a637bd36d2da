"""Micro-batching: concurrent requests that arrive within a few milliseconds run as one batch.

A model call costs much the same for one sample as for sixteen on a CPU or GPU, so under load the
server answers more requests per second by collating them. One worker owns the model (a single
thread: PyTorch and onnxruntime calls never overlap); requests wait at most ``max_wait`` for
company. A job is the samples of one request (an explanation brings 2^k), kept together.

The queue is bounded: past ``max_queue`` waiting jobs ``submit`` raises ``QueueFull`` (503 with
Retry-After) at once. A job whose request gave up (timed out, disconnected: its future is
cancelled) or whose deadline passed while it waited is dropped before its batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mmfuse.core.threads import follow_policy
from mmfuse.data.dataset import Sample
from mmfuse.serve.stages import Deadline, DeadlineExceeded, QueueFull

RunBatch = Callable[[list[Sample]], list[dict[str, Any]]]
BatchObserver = Callable[[int, float], None]
"""Called after each model call with the number of samples and the seconds it took (metrics)."""


@dataclass
class _Job:
    samples: list[Sample]
    future: asyncio.Future[list[dict[str, Any]]] = field(repr=False)
    deadline: Deadline | None = None

    @property
    def live(self) -> bool:
        """Someone still waits for the answer, and it can still come in time."""
        if self.future.done():
            return False
        if self.deadline is not None and self.deadline.passed:
            _settle(self, DeadlineExceeded(f"the prediction did not finish within {self.deadline.seconds:g} s"))
            return False
        return True


class MicroBatcher:
    def __init__(self, run: RunBatch, max_batch_size: int, max_wait_s: float,
                 observe: BatchObserver | None = None, max_queue: int | None = None) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._observe = observe
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmfuse-model")
        self._worker: asyncio.Task[None] | None = None
        self._carried: _Job | None = None
        """A job that did not fit the last batch: it starts the next one, keeping arrival order."""

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet in a running batch."""
        return self._queue.qsize() + (self._carried is not None)

    async def submit(self, samples: list[Sample], deadline: Deadline | None = None) -> list[dict[str, Any]]:
        """The predictions of ``samples``, in order, once a batch holding them has run; ``QueueFull``
        when ``max_queue`` jobs already wait, ``DeadlineExceeded`` if ``deadline`` passes first."""
        if self.max_queue is not None and self.waiting >= self.max_queue:
            raise QueueFull("the model", self.max_queue)
        job = _Job(samples, asyncio.get_running_loop().create_future(), deadline)
        self._queue.put_nowait(job)
        return await job.future

    async def _loop(self) -> None:
        while True:
            jobs = await self._collect()
            jobs = [j for j in jobs if j.live]  # requests that gave up or ran out of time meanwhile
            if jobs:
                await self._run_jobs(jobs)

    async def _collect(self) -> list[_Job]:
        """The first waiting job plus whatever else fits and arrives within ``max_wait``."""
        first, self._carried = self._carried, None
        while first is None or not first.live:  # a dead job must not hold the batch open for company
            first = await self._queue.get()
        jobs = [first]
        size = len(jobs[0].samples)
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(job.samples) > self.max_batch_size:
                self._carried = job
                break
            jobs.append(job)
            size += len(job.samples)
        return jobs

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        """Runs the jobs as one batch; if it fails, each job alone, so one bad request fails alone."""
        samples = [s for j in jobs for s in j.samples]
        try:
            results = await self._call(samples)
        except Exception as exc:
            if len(jobs) == 1:
                _settle(jobs[0], exc)
                return
            for job in jobs:
                await self._run_jobs([job])
            return
        start = 0
        for job in jobs:
            _settle(job, results[start: start + len(job.samples)])
            start += len(job.samples)

    def _run_following(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """The model's batch, after the thread policy's pending change (``core.threads``): in the
        model's thread, between batches, as a change must be made."""
        follow_policy()
        return self._run(samples)

    async def _call(self, samples: list[Sample]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_following, samples)
        if self._observe is not None:
            self._observe(len(samples), time.perf_counter() - started)
        return results


def _settle(job: _Job, outcome: list[dict[str, Any]] | BaseException) -> None:
    if job.future.done():
        return
    if isinstance(outcome, BaseException):
        job.future.set_exception(outcome)
    else:
        job.future.set_result(outcome)
