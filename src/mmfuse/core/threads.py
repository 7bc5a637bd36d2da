"""How many CPU threads and processes a command uses: chosen from the cores this process may use
and from what the rest of the machine is doing, not from ``os.cpu_count()``.

Why: torch starts one OpenMP thread per core and makes every op wait for the slowest of them. On a
2-core machine where one other CPU-bound process runs, that made a demo model 14x slower (104 s
instead of 7.5 s for three epochs; benchmarks/RESULTS.md, "Busy CPU"), while one thread ran in 10 s.
Three facts decide the count:

- the usable cores: the CPU affinity mask, capped by a cgroup CPU quota (v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us``) as containers and batch systems set it; a quota of 1.5 cores gives 1 thread;
- the cores other processes keep busy, sampled from ``/proc/stat`` minus this process's own CPU time
  (and its children's, such as DataLoader workers);
- explicit settings (``trainer.threads``, ``--threads``, then ``MMFUSE_THREADS``) win over both.

``ThreadWatch`` repeats the sample every few seconds while a long command runs, so training that
started on an idle machine drops to one thread when a competitor appears and goes back when it
leaves; the compute thread applies the change at a step boundary (``apply``), never in the middle
of an op. Only the intra-op count moves: torch can size its inter-op pool once per process.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmfuse.core.errors import ConfigError

SAMPLE_SECONDS = 0.1
"""How long the first look at the machine takes: enough to see a busy core (10 ticks of 10 ms)."""
ENV = "MMFUSE_THREADS"
"""An explicit thread count for every command of this process (``trainer.threads`` / ``--threads`` win)."""
WATCH_SECONDS = 2.0
"""How often a running command looks again; a change needs two looks that agree."""


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) as cores; None = no quota."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100_000.0
    return float(parts[0]) / period if period > 0 else None


def parse_cfs(quota: str, period: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` as cores; a quota of -1 means none."""
    q, p = int(quota.strip()), int(period.strip())
    return q / p if q > 0 and p > 0 else None


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (and of each parent cgroup: the smallest wins), in cores."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2 unified
            quotas += _walk(root, path, lambda d: parse_cpu_max((d / "cpu.max").read_text()))
        elif "cpu" in controllers.split(","):  # v1
            base = next((root / name for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (root / name).is_dir()), None)
            if base is not None:
                quotas += _walk(base, path, lambda d: parse_cfs((d / "cpu.cfs_quota_us").read_text(),
                                                               (d / "cpu.cfs_period_us").read_text()))
    return min(quotas) if quotas else None


def _walk(base: Path, path: str, read: object) -> list[float]:
    """Quotas found from ``base/path`` up to ``base`` (a container sees its own cgroup as ``/``)."""
    found: list[float] = []
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    for depth in range(len(parts), -1, -1):
        folder = base.joinpath(*parts[:depth])
        with contextlib.suppress(OSError, ValueError, IndexError):
            value = read(folder)  # type: ignore[operator]
            if value is not None:
                found.append(float(value))
    return found


def affinity_cores() -> int:
    """CPUs this process may run on (``taskset``, ``numactl``, a batch system's binding)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def usable_cores(affinity: int | None = None, quota: float | None = None) -> float:
    """The cores this process may use: the affinity mask, capped by the cgroup quota."""
    cores = float(affinity if affinity is not None else affinity_cores())
    limit = quota if quota is not None else cgroup_quota()
    return min(cores, limit) if limit is not None else cores


def whole_cores(usable: float) -> int:
    """Threads that fit in ``usable`` cores without waiting for quota: 1.5 -> 1, 2.0 -> 2, 0.5 -> 1."""
    return max(1, math.floor(usable + 1e-9))


def plan_threads(usable: float, busy_elsewhere: float = 0.0, requested: int | None = None,
                 loader_workers: int = 0) -> int:
    """Intra-op threads for one model: the whole cores left free by other processes (rounded: a
    background daemon at 0.3 cores does not cost a thread), less one per DataLoader worker (each
    decodes on a core of its own), at least 1, at most the usable cores; ``requested`` wins."""
    if requested is not None:
        return requested
    free = usable - max(0.0, busy_elsewhere) - loader_workers
    return max(1, min(whole_cores(usable), math.floor(free + 0.5)))


def plan_processes(usable: float, runs: int, threads_per_run: int = 1) -> int:
    """Processes for ``runs`` independent trainings (demo, bench): one per usable core at
    ``threads_per_run`` threads each. Independent processes share a busy machine far better than
    threads of one op (no waiting for the slowest), so this count is not lowered by other load."""
    return max(1, min(runs, whole_cores(usable) // max(1, threads_per_run)))


# ---- what the rest of the machine is doing --------------------------------------------------------


def _machine_busy_seconds(cpus: set[int], stat: Path = Path("/proc/stat")) -> tuple[float, float] | None:
    """(busy CPU seconds, elapsed seconds per CPU) since boot, over the CPUs in ``cpus`` only: load
    on cores this process may not run on does not concern it."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    seen = 0
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        busy += sum(ticks) - ticks[3] - ticks[4]
        total += sum(ticks)
        seen += 1
    if not seen:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return busy / hz, total / hz / seen


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its live children (DataLoader and pack workers)."""
    total = time.process_time()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in _children(os.getpid()):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / hz  # utime, stime
    return total


def _children(pid: int, depth: int = 0) -> list[int]:
    found: list[int] = []
    if depth > 3:
        return found
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *_children(int(child), depth + 1)]
    return found


class BusySampler:
    """Cores kept busy by other processes between two looks (0.0 where ``/proc`` is absent)."""

    def __init__(self) -> None:
        self._cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        machine = _machine_busy_seconds(self._cpus) if self._cpus else None
        return None if machine is None else (*machine, _own_cpu_seconds())

    def sample(self) -> float:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None:
            return 0.0
        busy, elapsed, own = (a - b for a, b in zip(now, last, strict=True))
        return max(0.0, (busy - own) / elapsed) if elapsed > 0 else 0.0


def busy_elsewhere(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores other processes keep busy over the next ``seconds``."""
    sampler = BusySampler()
    time.sleep(seconds)
    return sampler.sample()


# ---- applying it -----------------------------------------------------------------------------------


@dataclass
class ThreadWatch:
    """Keeps torch's intra-op threads at ``plan_threads`` while a command runs (see the module doc).

    A daemon thread samples the machine every ``interval`` seconds; ``apply()``, called by the
    compute thread between steps, sets the new count once two samples agree. ``changes`` records
    (seconds since start, from, to, busy cores) for the run's notes.
    """

    usable: float
    threads: int
    loader_workers: int = 0
    interval: float = WATCH_SECONDS
    changes: list[tuple[float, int, int, float]] = field(default_factory=list)
    _wanted: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = field(default_factory=time.perf_counter)
    _busy: float = 0.0

    def start(self) -> ThreadWatch:
        self._wanted = self.threads
        if whole_cores(self.usable) > 1:  # one core: nothing to choose
            self._thread = threading.Thread(target=self._loop, name="mmfuse-thread-watch", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        sampler, previous = BusySampler(), None
        while not self._stop.wait(self.interval):
            busy = sampler.sample()
            wanted = plan_threads(self.usable, busy, loader_workers=self.loader_workers)
            if wanted == previous:
                self._wanted, self._busy = wanted, busy
            previous = wanted

    def apply(self) -> None:
        wanted = self._wanted
        if wanted and wanted != self.threads:
            import torch

            torch.set_num_threads(wanted)
            self.changes.append((round(time.perf_counter() - self._started, 1), self.threads, wanted,
                                 round(self._busy, 2)))
            self.threads = wanted

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)


def _env_threads() -> int:
    value = os.environ.get(ENV, "")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{ENV}={value!r}: expected a whole number of threads, at least 1")
    return int(value)


_active: list[ThreadWatch | None] = []
"""The policies in force, innermost last: ``train`` holds one around data preparation and ``fit``
another around training; the inner one reuses the outer look instead of sampling again."""


def follow_policy() -> None:
    """Applies the innermost policy's pending change, if any: called between steps by whichever
    thread runs the model (the training loop, the server's model thread)."""
    watch = _active[-1] if _active else None
    if watch is not None:
        watch.apply()


@contextlib.contextmanager
def thread_policy(requested: int | None = None, loader_workers: int = 0,
                  watch: bool = True) -> Iterator[ThreadWatch | None]:
    """Runs the block with the policy's intra-op threads and yields the ``ThreadWatch`` that keeps
    them right (None when ``requested`` fixes the count: a user's setting never moves). The
    inter-op pool is sized when still possible; the intra-op count is restored afterwards. Inside
    another policy's block an automatic request reuses that one's threads and watch."""
    import torch

    if requested is None and os.environ.get(ENV):
        requested = _env_threads()
    if requested is None and _active:
        _active.append(_active[-1])
        try:
            yield _active[-1]
        finally:
            _active.pop()
        return
    usable = usable_cores()
    threads = requested if requested is not None else plan_threads(
        usable, busy_elsewhere() if whole_cores(usable) > 1 else 0.0, loader_workers=loader_workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # "cannot set number of interop threads after parallel work"
        torch.set_num_interop_threads(whole_cores(usable) if requested is None else requested)
    watcher = ThreadWatch(usable, threads, loader_workers).start() if requested is None and watch else None
    _active.append(watcher)
    try:
        yield watcher
    finally:
        _active.pop()
        if watcher is not None:
            watcher.stop()
        torch.set_num_threads(previous)
