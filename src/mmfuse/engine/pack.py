"""Packs: every split preprocessed once, in parallel, into WebDataset shards that training streams.

``pack_data(config, folder)`` (``mmfuse data pack``) reads the manifests, fits vocabulary and labels on
train exactly as ``prepare_data`` does, then preprocesses each shard's records (``build_sample``: the
tensors the per-sample path gives) in a pool of worker processes. The folder ends up holding

- ``<split>-NNNNN.tar`` + ``<split>-NNNNN.tar.index.json`` per shard (see ``mmfuse.data.pack_format``);
- ``pack.json``, written last: the fingerprint (``fingerprint``), the fitted preprocessor and task
  state, sample counts and the skipped samples per split with their reasons;
- ``files.json``: the SHA-256 of every input file, so a mismatch can name the file that changed.

A shard is written atomically (tar first, then its index), and a shard's content depends on its
records alone, so a killed pack run again continues where it stopped: finished shards are kept and
the result is byte-identical to an uninterrupted pack (``pack.partial.json`` holds the fingerprint
the unfinished pack was started with; a different one starts over). A finished pack is never
rewritten unless ``rebuild``.

``open_pack(config, folder)`` (``data.pack``) checks the pack against the config and returns the
``PreparedData`` training, evaluation and bench use, with ``PackDataset`` splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from mmfuse.config import ExperimentConfig
from mmfuse.core.atomic import atomic_file, write_text_atomic
from mmfuse.core.errors import DataError
from mmfuse.data.dataset import MultimodalDataset, Sample, SkipReport, build_sample
from mmfuse.data.manifest import Record
from mmfuse.data.memory import _file_digests, preprocessing_identity
from mmfuse.data.pack_dataset import PackDataset, check_shard
from mmfuse.data.pack_format import FORMAT, INDEX_SUFFIX, ShardIndex, write_shard
from mmfuse.data.preprocess import Preprocessor
from mmfuse.engine.data import PreparedData, fit_preprocessing, load_records, new_preprocessor
from mmfuse.tasks import TASKS, Task

PACK_FILE, PARTIAL_FILE, FILES_FILE = "pack.json", "pack.partial.json", "files.json"
DEFAULT_SHARD_SIZE = 1000
PREPROCESSING_FIELDS = {"modalities", "text", "image", "audio", "features", "on_error", "id_column", "target_column"}
"""The ``data`` settings that shape the packed tensors (batch size, workers and the like do not)."""


def _sha(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(config: ExperimentConfig, splits: dict[str, list[Record]],
                preprocessor: Preprocessor) -> tuple[dict[str, Any], list[list[object]]]:
    """What a pack is a function of, and the (path, SHA-256) of every input file.

    The preprocessing settings, the task, the records of each split (ids, fields, targets, so a
    re-split or an edited manifest differs), the content of every referenced file, and the versions
    and code that turn records into tensors (``preprocessing_identity``, mmfuse's version included).
    The fitted vocabulary and labels follow from these and are stored beside them in ``pack.json``.
    """
    files = _file_digests([r for records in splits.values() for r in records], preprocessor)
    return {
        "format": FORMAT,
        "preprocessing": config.data.model_dump(mode="json", include=PREPROCESSING_FIELDS),
        "task": {"name": config.task.name, "options": config.task.options},
        "records": {name: _sha([[r.id, r.fields, r.target] for r in records]) for name, records in splits.items()},
        "files": _sha(files),
        "code": preprocessing_identity(),
    }, files


def differences(saved: dict[str, Any], current: dict[str, Any], saved_files: list[list[object]] | None,
                current_files: list[list[object]]) -> list[str]:
    """What differs between a pack's fingerprint and the config's, in words (empty when they match)."""
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if key == "preprocessing" and isinstance(old, dict) and isinstance(new, dict):
            out += [f"data.{k}: {old.get(k)!r} in the pack, {new.get(k)!r} in the config"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif key == "files":
            before = dict((str(p), d) for p, d in saved_files or [])
            changed = [str(p) for p, d in current_files if before.get(str(p), "absent") != d]
            changed += [p for p in before if p not in {str(q) for q, _ in current_files}]
            out.append(f"input files changed since packing: {', '.join(changed[:3]) or 'unknown'}"
                       + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
        elif key == "records":
            splits = sorted(s for s in set(old or {}) | set(new or {}) if (old or {}).get(s) != (new or {}).get(s))
            out.append(f"the manifest rows of {', '.join(splits)} differ")
        elif key == "code":
            out.append("mmfuse or a decoding library was upgraded or edited since packing")
        else:
            out.append(f"{key}: {old!r} in the pack, {new!r} in the config")
    return out


@dataclass
class PackResult:
    folder: Path
    counts: dict[str, int]
    skipped: dict[str, dict[str, int]]
    """Per split: reason -> number of samples skipped for it."""
    shards_written: int = 0
    shards_kept: int = 0
    already_packed: bool = False
    messages: list[str] = field(default_factory=list)


@dataclass
class _Shard:
    split: str
    number: int
    first_key: int
    records: list[Record]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:05d}.tar"


_WORKER: tuple[Preprocessor, Task, str, Path] | None = None


def _init_worker(preprocessor: Preprocessor, task: Task, on_error: str, folder: Path) -> None:
    global _WORKER
    torch.set_num_threads(1)  # one process per core already
    _WORKER = (preprocessor, task, on_error, folder)


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
        spans = write_shard(tmp, samples, shard.first_key)
        size = tmp.stat().st_size
    index = ShardIndex(shard.name, size, spans, report.entries())
    write_text_atomic(path.with_name(path.name + INDEX_SUFFIX), index.to_json())
    return shard.split, len(samples), report.count


def _finished(folder: Path, shard: _Shard) -> bool:
    path = folder / shard.name
    index_path = path.with_name(path.name + INDEX_SUFFIX)
    if not index_path.is_file():
        return False
    try:
        check_shard(path, ShardIndex.read(index_path))
    except DataError:
        return False
    return True


def _clear(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name in (PACK_FILE, PARTIAL_FILE, FILES_FILE, "tokenizers") or path.suffix == ".tar" \
                or path.name.endswith(INDEX_SUFFIX):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


Progress = Callable[[int, int], None]
"""Called with (samples done, samples in all) as shards finish."""


def pack_data(config: ExperimentConfig, folder: Path, workers: int | None = None, rebuild: bool = False,
              shard_size: int = DEFAULT_SHARD_SIZE, progress: Progress | None = None) -> PackResult:
    """Packs the config's data into ``folder`` (see the module docstring); ``workers`` defaults to the cores."""
    folder = Path(folder)
    splits = load_records(config)
    current, files = fingerprint(config, splits, new_preprocessor(config))
    saved = _read_json(folder / PACK_FILE)
    if saved is not None and not rebuild:
        diff = differences(saved["fingerprint"], current, _load_files(folder), files)
        if diff:
            raise DataError(f"{folder} holds a pack of other data or preprocessing ({'; '.join(diff)}); "
                            "pass --rebuild to replace it")
        return PackResult(folder, saved["counts"], saved["skipped"], shards_kept=len(saved["shards"]),
                          already_packed=True)
    folder.mkdir(parents=True, exist_ok=True)
    partial = _read_json(folder / PARTIAL_FILE)
    if rebuild or saved is not None or partial != {"fingerprint": current, "shard_size": shard_size}:
        _clear(folder)
    preprocessor, task = fit_preprocessing(config, splits)
    write_text_atomic(folder / PARTIAL_FILE, json.dumps({"fingerprint": current, "shard_size": shard_size}))
    preprocessor.save_assets(folder)
    plan = [_Shard(name, i // shard_size, i, records[i:i + shard_size])
            for name, records in sorted(splits.items()) for i in range(0, len(records), shard_size)]
    todo = [s for s in plan if not _finished(folder, s)]
    total = sum(len(s.records) for s in plan)
    done = total - sum(len(s.records) for s in todo)
    if progress:
        progress(done, total)
    _run(todo, (preprocessor, task, config.data.on_error, folder), workers or os.cpu_count() or 1,
         lambda n: progress(n, total) if progress else None, done)
    return _finish(config, folder, plan, current, files, preprocessor, task, len(plan) - len(todo), len(todo))


def _run(todo: list[_Shard], context: tuple[Preprocessor, Task, str, Path], workers: int,
         report: Callable[[int], None], done: int) -> None:
    """Packs the shards in ``todo``: in this process for one worker, else in a pool of forked ones."""
    if workers <= 1 or len(todo) <= 1:
        global _WORKER
        previous, _WORKER = _WORKER, context
        try:
            for shard in todo:
                done += len(shard.records)
                _pack_shard(shard)
                report(done)
        finally:
            _WORKER = previous
        return
    # fork: the fitted preprocessor and task reach the workers without pickling.
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("fork"),
                             initializer=_init_worker, initargs=context) as pool:
        futures: dict[Future[tuple[str, int, int]], _Shard] = {pool.submit(_pack_shard, s): s for s in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
                done += len(futures[future].records)
            report(done)


def _finish(config: ExperimentConfig, folder: Path, plan: list[_Shard], current: dict[str, Any],
            files: list[list[object]], preprocessor: Preprocessor, task: Task, kept: int, written: int) -> PackResult:
    counts: dict[str, int] = {}
    skipped: dict[str, dict[str, int]] = {}
    shards: dict[str, list[str]] = {}
    for shard in plan:
        index = ShardIndex.read(folder / (shard.name + INDEX_SUFFIX))
        counts[shard.split] = counts.get(shard.split, 0) + len(index.spans)
        shards.setdefault(shard.split, []).append(shard.name)
        reasons = skipped.setdefault(shard.split, {})
        for reason, n in Counter(skip_reason(row.get("reason", "")) for row in index.skipped).items():
            reasons[reason] = reasons.get(reason, 0) + n
    skipped = {name: reasons for name, reasons in skipped.items() if reasons}
    if counts.get("train", 0) == 0:
        raise DataError("every training sample was skipped; nothing to pack")
    write_text_atomic(folder / FILES_FILE, json.dumps(files))
    state = {"format": FORMAT, "fingerprint": current, "preprocessor": preprocessor.state(), "task": task.state(),
             "counts": counts, "skipped": skipped, "shards": shards, "config_data": config.data.model_dump(
                 mode="json", include=PREPROCESSING_FIELDS)}
    write_text_atomic(folder / PACK_FILE, json.dumps(state, indent=1))
    (folder / PARTIAL_FILE).unlink(missing_ok=True)
    return PackResult(folder, counts, skipped, shards_written=written, shards_kept=kept)


def skip_reason(reason: str) -> str:
    """A skip message with the paths it names replaced by ``<file>``, so equal reasons count together."""
    return re.sub(r"'?[^\s']*/[^\s':]*'?", "<file>", reason)


def _load_files(folder: Path) -> list[list[object]] | None:
    try:
        return list(json.loads((folder / FILES_FILE).read_text()))
    except (OSError, ValueError):
        return None


def open_pack(config: ExperimentConfig, folder: Path) -> PreparedData:
    """The pack's splits and fitted preprocessing, after checking it was packed from this config's data."""
    folder = Path(folder)
    saved = _read_json(folder / PACK_FILE)
    if saved is None:
        hint = " (an unfinished pack: run `mmfuse data pack` again to finish it)" \
            if (folder / PARTIAL_FILE).exists() else ""
        raise DataError(f"{folder} is not a finished pack: no {PACK_FILE}{hint}")
    splits = load_records(config)
    current, files = fingerprint(config, splits, new_preprocessor(config))
    diff = differences(saved["fingerprint"], current, _load_files(folder), files)
    if diff:
        raise DataError(f"the pack {folder} does not match the config: {'; '.join(diff)}; "
                        "rebuild it with `mmfuse data pack --rebuild` (or `mmfuse train --rebuild-pack`)")
    preprocessor = Preprocessor.from_state(saved["preprocessor"], folder)
    task = TASKS.create(config.task.name, **config.task.options)
    task.load_state(saved["task"])
    datasets: dict[str, MultimodalDataset] = {}
    for name, shard_names in saved["shards"].items():
        report = SkipReport()
        for shard in shard_names:
            for row in ShardIndex.read(folder / (shard + INDEX_SUFFIX)).skipped:
                report.skipped.append(str(row.get("reason", "")))
                report.rows.append(row)
        datasets[name] = PackDataset([folder / shard for shard in shard_names], report)
    return PreparedData(preprocessor, task, datasets)


def ensure_pack(config: ExperimentConfig, folder: Path, workers: int | None = None) -> PackResult:
    """The pack in ``folder``, packed (or repacked) first when it is missing, unfinished or of other data."""
    saved = _read_json(Path(folder) / PACK_FILE)
    stale = False
    if saved is not None:
        current, files = fingerprint(config, load_records(config), new_preprocessor(config))
        stale = bool(differences(saved["fingerprint"], current, _load_files(Path(folder)), files))
    return pack_data(config, folder, workers=workers, rebuild=stale)
