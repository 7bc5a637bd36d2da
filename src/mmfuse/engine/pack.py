"""Packs: every split preprocessed once, in parallel, into WebDataset shards that training streams.

``pack_data(config, folder)`` (``mmfuse data pack``) reads the manifests, fits vocabulary and labels on
train exactly as ``prepare_data`` does, then preprocesses each shard's records (``build_sample``: the
tensors the per-sample path gives) in a pool of worker processes. The folder ends up holding

- ``<split>-NNNNN.tar`` + ``<split>-NNNNN.tar.index.json`` per shard (see ``mmfuse.data.pack_format``);
- ``pack.json``, written last: the fingerprint (``fingerprint``), the fitted preprocessor and task
  state, sample counts and the skipped samples per split with their reasons;
- ``files.json``: the SHA-256 and stat stamp of every input file, so a mismatch can name the file that
  changed and a check re-reads only files whose stamp changed (``mmfuse.engine.pack_fingerprint``).

A shard is written atomically (tar first, then its index), and a shard's content depends on its
records alone, so a killed pack run again continues where it stopped: finished shards are kept and
the result is byte-identical to an uninterrupted pack (``pack.partial.json`` holds the fingerprint
the unfinished pack was started with; a different one starts over). A finished pack is never
rewritten unless ``rebuild``.

``mmfuse.engine.pack_open.open_pack`` (``data.pack``) checks a finished pack against the config and
returns the ``PreparedData`` training, evaluation and bench use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Any

import torch

from mmfuse.config import ExperimentConfig
from mmfuse.core.atomic import atomic_file, write_text_atomic
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.core.folder_lock import folder_lock, held_parts
from mmfuse.core.locations import is_url
from mmfuse.core.threads import usable_cores, whole_cores
from mmfuse.data.dataset import Sample, SkipReport, build_sample
from mmfuse.data.manifest import Record
from mmfuse.data.pack_compact import compactor_for
from mmfuse.data.pack_format import (
    FORMAT,
    INDEX_SUFFIX,
    ShardIndex,
    checked_shards,
    shard_layouts,
    shard_name,
    write_shard,
)
from mmfuse.data.pack_integrity import shard_digests
from mmfuse.data.preprocess import Preprocessor
from mmfuse.engine.interrupts import SignalInterrupt, raise_on_signals
from mmfuse.engine.pack_check import pack_differences
from mmfuse.engine.pack_fingerprint import (
    FILES_FILE,
    PREPROCESSING_FIELDS,
    changed_files,
    differences,
    fingerprint,
    load_files,
    write_files,
)
from mmfuse.engine.pack_open import PARTIAL_FILE
from mmfuse.engine.pack_verify import PACK_FILE, read_json, shard_damage
from mmfuse.engine.records import fit_preprocessing, load_records, new_preprocessor
from mmfuse.tasks import Task

DEFAULT_SHARD_SIZE = 1000
@dataclass
class PackResult:
    folder: Path
    counts: dict[str, int]
    skipped: dict[str, dict[str, int]]
    """Per split: reason -> number of samples skipped for it."""
    shards_written: int = 0
    shards_kept: int = 0
    already_packed: bool = False
    """A finished pack of this data was there and every shard verified whole."""
    messages: list[str] = field(default_factory=list)


@dataclass
class _Shard:
    split: str
    number: int
    first_key: int
    records: list[Record]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)


_WORKER: tuple[Preprocessor, Task, str, Path] | None = None


def _init_worker(preprocessor: Preprocessor, task: Task, on_error: str, folder: Path) -> None:
    global _WORKER
    torch.set_num_threads(1)  # one process per core already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops the pool
    _exit_with_parent(os.getppid())
    _WORKER = (preprocessor, task, on_error, folder)


def _exit_with_parent(parent: int) -> None:
    """Ends this worker within half a second of its parent's death. A parent killed with kill -9 cannot
    stop its pool, and each worker would stay blocked on the pool's queue for ever, holding its memory
    (~565 MB each was measured); the kernel gives an orphan a new parent, which is what is watched."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="mmfuse-exit-with-parent", daemon=True).start()


def _pack_shard(shard: _Shard) -> tuple[str, int, int]:
    """Preprocesses and writes one shard (tar, then its index); returns (split, samples, skipped)."""
    assert _WORKER is not None
    preprocessor, task, on_error, folder = _WORKER
    samples: list[Sample] = []
    report = SkipReport()
    for record in shard.records:
        try:
            samples.append(build_sample(record, preprocessor, task))
        except DataError as exc:
            if on_error == "raise":
                raise
            report.add(record, str(exc))
    path = folder / shard.name
    with atomic_file(path) as tmp:
        spans = write_shard(tmp, samples, shard.first_key, compactor_for(preprocessor))
        size = tmp.stat().st_size
        layouts = shard_layouts(tmp, spans)
        sha256, members = shard_digests(tmp, spans, layouts)
    index = ShardIndex(shard.name, size, spans, report.entries(), layouts, sha256, members, shard.first_key)
    write_text_atomic(path.with_name(path.name + INDEX_SUFFIX), index.to_json())
    return shard.split, len(samples), report.count


def _finished(folder: Path, shard: _Shard) -> bool:
    """Whether the shard and its index are there and the shard's bytes are the ones its index proves."""
    return shard_damage(folder, shard.name) is None


def _clear(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name in (PACK_FILE, PARTIAL_FILE, FILES_FILE, "tokenizers") or path.suffix == ".tar" \
                or path.name.endswith(INDEX_SUFFIX):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


Progress = Callable[[int, int], None]
"""Called with (samples done, samples in all) as shards finish."""
Context = tuple[Preprocessor, Task, str, Path]
"""What packing a shard needs: the fitted preprocessor and task, ``data.on_error`` and the folder."""
Runner = Callable[[list[_Shard], Context, int, Callable[[int], None], int], None]
"""Packs a list of shards of the plan (``_run``: the local pool; ``mmfuse.engine.pack_ray``: Ray tasks)."""


def pack_data(config: ExperimentConfig, folder: Path, workers: int | None = None, rebuild: bool = False,
              shard_size: int = DEFAULT_SHARD_SIZE, progress: Progress | None = None,
              runner: Runner | None = None) -> PackResult:
    """Packs the config's data into ``folder`` (see the module docstring); ``workers`` defaults to the cores.

    A finished pack of the same data is verified shard by shard and only damaged shards are packed
    again (``PackResult.repaired``): the result hashes equal to a pack written whole. The folder is
    locked for the duration: a second process packing into it, or a part of a pack in parts writing it
    (``mmfuse.engine.pack_parts``), is refused. ``runner`` packs the shards (default: the local pool)."""
    check_pack_extra()
    folder = Path(folder)
    with folder_lock(folder, "packing"), raise_on_signals():
        refuse_parts(folder, "packing")
        try:
            return _pack_locked(config, folder, workers, rebuild, shard_size, progress, runner or _run)
        except SignalInterrupt as stop:
            raise SignalInterrupt(stop.signum, note=f"the finished shards in {folder} are kept: run the same "
                                  "`mmfuse data pack` command again to continue") from None


def check_pack_extra() -> None:
    """Refuses before any work (not as a traceback in a worker) when WebDataset is missing."""
    if importlib.util.find_spec("webdataset") is None:
        raise ConfigError("packing writes WebDataset shards and needs the pack extra: pip install 'mmfuse[pack]' "
                          "(training from a finished pack does not)")


def refuse_parts(folder: Path, what: str) -> None:
    """Refuses ``what`` (a holder of the folder's lock) while parts of a pack in parts write ``folder``."""
    parts = held_parts(folder)
    if parts:
        raise DataError(f"{folder} is being packed in parts ({'; '.join(parts)[:300]}); wait for them to finish "
                        f"({what} refused)")


def _pack_locked(config: ExperimentConfig, folder: Path, workers: int | None, rebuild: bool, shard_size: int,
                 progress: Progress | None, runner: Runner) -> PackResult:
    splits = load_records(config)
    saved = read_json(folder / PACK_FILE)
    saved_files = load_files(folder)
    current, files = fingerprint(config, splits, new_preprocessor(config), saved_files)
    workers = workers or whole_cores(usable_cores())  # affinity and cgroup quota, not the host's cores
    if saved is not None and not rebuild:
        diff = differences(saved["fingerprint"], current, changed_files(saved_files, files))
        if diff:
            raise DataError(f"{folder} holds a pack of other data or preprocessing ({'; '.join(diff)}); "
                            "pass --rebuild to replace it")
        repaired = _repair(config, folder, splits, saved, workers, progress, runner)
        if repaired is not None:
            return repaired
        rebuild = True  # a pack from before digests (or of another layout): written again whole
    partial = read_json(folder / PARTIAL_FILE)
    if rebuild or saved is not None or partial != {"fingerprint": current, "shard_size": shard_size}:
        _clear(folder)
    preprocessor, task = fit_preprocessing(config, splits)
    write_text_atomic(folder / PARTIAL_FILE, json.dumps({"fingerprint": current, "shard_size": shard_size}))
    preprocessor.save_assets(folder)
    plan = _plan(splits, shard_size)
    todo = [s for s in plan if not _finished(folder, s)]
    total = sum(len(s.records) for s in plan)
    done = total - sum(len(s.records) for s in todo)
    if progress:
        progress(done, total)
    runner(todo, (preprocessor, task, config.data.on_error, folder), workers,
           lambda n: progress(n, total) if progress else None, done)
    return _finish(config, folder, plan, current, files, preprocessor, task, len(plan) - len(todo), len(todo),
                   shard_size)


def _plan(splits: dict[str, list[Record]], shard_size: int) -> list[_Shard]:
    return [_Shard(name, i // shard_size, i, records[i:i + shard_size])
            for name, records in sorted(splits.items()) for i in range(0, len(records), shard_size)]


def _repair(config: ExperimentConfig, folder: Path, splits: dict[str, list[Record]], saved: dict[str, Any],
            workers: int, progress: Progress | None, runner: Runner) -> PackResult | None:
    """A finished pack of this data: every shard verified, the damaged ones packed again. None when the
    pack cannot be repaired in place (written before packs recorded their shard size and digests)."""
    shard_size = saved.get("shard_size")
    if not isinstance(shard_size, int) or shard_size < 1:
        return None
    plan = _plan(splits, shard_size)
    planned: dict[str, list[str]] = {}
    for shard in plan:
        planned.setdefault(shard.split, []).append(shard.name)
    if planned != checked_shards(saved.get("shards"), str(folder / PACK_FILE)):
        return None
    damaged = {s.name: why for s in plan if (why := shard_damage(folder, s.name)) is not None}
    result = PackResult(folder, saved["counts"], saved["skipped"], shards_kept=len(plan) - len(damaged),
                        already_packed=not damaged)
    if not damaged:
        return result
    todo = [s for s in plan if s.name in damaged]
    result.messages += [f"repairing: {why}" for why in damaged.values()]
    preprocessor, task = fit_preprocessing(config, splits)
    total = sum(len(s.records) for s in todo)
    if progress:
        progress(0, total)
    runner(todo, (preprocessor, task, config.data.on_error, folder), workers,
           lambda n: progress(n, total) if progress else None, 0)
    still = [why for s in todo if (why := shard_damage(folder, s.name)) is not None]
    if still:
        raise DataError(f"repacking did not give the shards their recorded content: {still[0]}; the input files "
                        "may have changed: pass --rebuild")
    result.shards_written = len(todo)
    return result


def _run(todo: list[_Shard], context: Context, workers: int, report: Callable[[int], None], done: int,
         job: Callable[[_Shard], object] = _pack_shard) -> None:
    """Packs the shards in ``todo`` with ``job`` (default ``_pack_shard``; packing to a URL also uploads):
    in this process for one worker, else in a pool of forked ones."""
    if workers <= 1 or len(todo) <= 1:
        global _WORKER
        previous, _WORKER = _WORKER, context
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a worker: many small ops, for which more threads only contend (8x slower)
        try:
            for shard in todo:
                done += len(shard.records)
                job(shard)
                report(done)
        finally:
            _WORKER = previous
            torch.set_num_threads(threads)
        return
    # fork: the fitted preprocessor and task reach the workers without pickling.
    before = set(active_children())
    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("fork"),
                               initializer=_init_worker, initargs=context)
    try:
        futures: dict[Future[object], _Shard] = {pool.submit(job, s): s for s in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
                done += len(futures[future].records)
            report(done)
    except BaseException:
        # An error, Ctrl-C or SIGTERM: the shards being written are abandoned (their temporaries are
        # cleared by the next run) and no worker outlives this run.
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in set(active_children()) - before:
            worker.kill()
        raise
    pool.shutdown()


def _finish(config: ExperimentConfig, folder: Path, plan: list[_Shard], current: dict[str, Any],
            files: list[list[object]], preprocessor: Preprocessor, task: Task, kept: int, written: int,
            shard_size: int) -> PackResult:
    counts: dict[str, int] = {}
    skipped: dict[str, dict[str, int]] = {}
    shards: dict[str, list[str]] = {}
    digests: dict[str, str | None] = {}
    for shard in plan:
        index = ShardIndex.read(folder / (shard.name + INDEX_SUFFIX))
        digests[shard.name] = index.sha256
        counts[shard.split] = counts.get(shard.split, 0) + len(index.spans)
        shards.setdefault(shard.split, []).append(shard.name)
        reasons = skipped.setdefault(shard.split, {})
        for reason, n in Counter(skip_reason(row.get("reason", "")) for row in index.skipped).items():
            reasons[reason] = reasons.get(reason, 0) + n
    skipped = {name: reasons for name, reasons in skipped.items() if reasons}
    if counts.get("train", 0) == 0:
        raise DataError("every training sample was skipped; nothing to pack")
    write_files(folder, files)
    state = {"format": FORMAT, "fingerprint": current, "preprocessor": preprocessor.state(), "task": task.state(),
             "counts": counts, "skipped": skipped, "shards": shards, "shard_size": shard_size,
             "shard_sha256": digests, "assets": assets(folder),
             "config_data": config.data.model_dump(mode="json", include=PREPROCESSING_FIELDS)}
    write_text_atomic(folder / PACK_FILE, json.dumps(state, indent=1))
    (folder / PARTIAL_FILE).unlink(missing_ok=True)
    return PackResult(folder, counts, skipped, shards_written=written, shards_kept=kept)


def assets(folder: Path) -> list[str]:
    """The pack's pretrained tokenizer files, relative to ``tokenizers/`` (what a remote reader fetches)."""
    root = folder / "tokenizers"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def skip_reason(reason: str) -> str:
    """A skip message with the paths it names replaced by ``<file>``, so equal reasons count together."""
    return re.sub(r"'?[^\s']*/[^\s':]*'?", "<file>", reason)


def ensure_pack(config: ExperimentConfig, location: str | Path, workers: int | None = None) -> PackResult:
    """The pack in ``location``, packed (or repacked) first when it is missing, unfinished or of other data."""
    if is_url(str(location)):
        raise ConfigError(f"--rebuild-pack packs into a local folder; for {location} run `mmfuse data pack --out "
                          f"{location}` first, then train with --pack {location}")
    folder = Path(location)
    saved = read_json(folder / PACK_FILE)
    stale = saved is not None and bool(pack_differences(config, folder, saved["fingerprint"]))
    return pack_data(config, folder, workers=workers, rebuild=stale)
