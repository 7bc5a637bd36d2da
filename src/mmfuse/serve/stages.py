"""Deadlines and bounded stages: work that can no longer be answered in time is never started.

A request has one deadline (``--timeout`` from its arrival). Decoding runs on a few threads
(``DecodeStage``): a thread cannot be interrupted, so the deadline is checked before a job starts
and between its steps, and a request that gave up releases its place only when its thread is
really done, so the number of decodes in flight never exceeds the thread count, whatever the
clients do. At most ``max_queue`` + the decode threads' count of predictions are in progress
(``Admission``, from arrival); one more is answered 503 with ``Retry-After`` at once, before its body
is parsed, so an overloaded server says so instead of letting every request time out. The decode
stage and the model's queue (``MicroBatcher``) each hold at most ``max_queue`` as a second line.

Memory goes back to the system after a large upload: glibc keeps what a decode thread freed in
that thread's arena (eight 16-bit 36 MP PNGs left ~400 MB resident for good), so after a decode
that left the process more than ``TRIM_SLACK`` above its size at start, ``malloc_trim`` returns it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from mmfuse.serve.inputs import BadRequest

T = TypeVar("T")

RETRY_AFTER_S = 1
"""What a 503 tells a client to wait: a queue drains within about a second at the measured rates."""
TRIM_SLACK = 64 * 1024 * 1024


class DeadlineExceeded(Exception):
    """The request's time ran out; raised where work would start, answered 504."""


class QueueFull(BadRequest):
    def __init__(self, stage: str, limit: int) -> None:
        super().__init__(503, f"the server is busy: {limit} requests already wait for {stage}; retry in "
                              f"{RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})


class Admission:
    """Counts the predictions in progress, from the moment a request arrives; past ``limit`` one is
    refused before its body is parsed (it is read and dropped: the connection stays usable), so a
    burst of clients costs the server almost nothing beyond the requests it can serve."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0

    def enter(self) -> None:
        if self.in_progress >= self.limit:
            raise BadRequest(503, f"the server is busy: {self.limit} requests are in progress; retry in "
                                  f"{RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
        self.in_progress += 1

    def leave(self) -> None:
        self.in_progress -= 1


class Deadline:
    """A point on the monotonic clock that work checks before it starts; ``cancel`` moves it to now
    (the request gave up: a thread working for it stops at its next check)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.cancelled = False

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def passed(self) -> bool:
        return self.cancelled or self.remaining() <= 0

    def check(self) -> None:
        if self.passed:
            raise DeadlineExceeded(f"the prediction did not finish within {self.seconds:g} s")


class DecodeStage:
    """At most ``workers`` decodes run at once and ``max_queue`` wait; a job starts only before its deadline."""

    def __init__(self, workers: int, max_queue: int) -> None:
        self.workers = workers
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmfuse-decode")
        self._slots = asyncio.Semaphore(workers)
        self._waiting = 0
        self._trim = MemoryTrim()

    @property
    def waiting(self) -> int:
        return self._waiting

    async def run(self, deadline: Deadline, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a decode thread; ``QueueFull`` if ``max_queue`` already wait."""
        if self._waiting >= self.max_queue:
            raise QueueFull("decoding", self.max_queue)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            deadline.check()
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._trim.after, fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())  # when the thread is done, not the request
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # a timeout or a disconnect: the thread stops at its next check
            deadline.cancel()
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class MemoryTrim:
    """Returns freed heap memory to the system when the process has grown past its start (glibc only)."""

    def __init__(self, slack: int = TRIM_SLACK) -> None:
        self._trim = _malloc_trim()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.limit = (self.rss() or 0) + slack

    def rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def after(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, then a trim if the process is now over its limit."""
        try:
            return fn(*args)
        finally:
            if self._trim is not None and (self.rss() or 0) > self.limit:
                self._trim(0)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
