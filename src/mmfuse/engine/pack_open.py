"""Opening a finished pack for a run (``data.pack``): a local folder or a URL, checked, its splits as datasets.

A finished pack is self-contained: its ``pack.json`` holds the fitted preprocessing and labels, each
shard index the digests that prove its shard. So a run needs only the pack, not the raw files it was
made from: a pack copied to another path, machine or bucket trains as it is. What a start checks:

- the parts of the fingerprint that decide what the tensors mean (preprocessing settings, task,
  format, mmfuse's preprocessing version): refused on any difference, naming it;
- the library versions that packed it against those installed: a warning naming each, refused only
  with ``data.pack_strict_versions``;
- with ``data.check_sources`` (``--check-sources``), also the manifests' records and every raw file's
  digest, as packing does (``mmfuse.engine.pack_check``): for a user who edits the raw data in place;
- each shard's bytes against its index, when the shard is first read (hashed once, then remembered).

A URL (``s3://``, ``gs://``, ``https://``...) is read through fsspec into a bounded local cache of
shards (``mmfuse.data.pack_cache``), so training, evaluation, bench and robustness read it exactly
as a local pack: the same samples in the same order, resumable mid-epoch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfuse.config import ExperimentConfig
from mmfuse.core.errors import DataError
from mmfuse.core.locations import is_url, member_url
from mmfuse.data.dataset import MultimodalDataset, SkipReport
from mmfuse.data.pack_cache import PackCache
from mmfuse.data.pack_dataset import PackDataset
from mmfuse.data.pack_format import INDEX_SUFFIX, MAX_INDEX_BYTES, ShardIndex, checked_shards
from mmfuse.data.pack_stream import read_url
from mmfuse.data.preprocess import Preprocessor
from mmfuse.engine.pack_check import pack_differences
from mmfuse.engine.pack_fingerprint import fingerprint_of, library_changes, portable_differences
from mmfuse.engine.pack_verify import PACK_FILE, read_json
from mmfuse.engine.records import PreparedData
from mmfuse.tasks import TASKS

log = logging.getLogger(__name__)
PARTIAL_FILE = "pack.partial.json"


def read_state(location: str) -> tuple[dict[str, Any], bytes]:
    """``pack.json`` of the pack at ``location`` (folder or URL), parsed, and its bytes."""
    if is_url(location):
        url = member_url(location, PACK_FILE)
        data = read_url(url)
    else:
        folder = Path(location)
        path = folder / PACK_FILE
        if read_json(path) is None:
            hint = " (an unfinished pack: run `mmfuse data pack` again to finish it)" \
                if (folder / PARTIAL_FILE).exists() else ""
            raise DataError(f"{folder} is not a finished pack: no {PACK_FILE}{hint}")
        url, data = str(path), path.read_bytes()
    try:
        state = json.loads(data)
    except ValueError as exc:
        raise DataError(f"{url}: not a pack's pack.json ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict):
        raise DataError(f"{url}: not a pack's pack.json (no fingerprint)")
    return state, data


def check_pack(config: ExperimentConfig, location: str, saved: dict[str, Any]) -> list[str]:
    """Refuses a pack whose tensors mean something else than this config's would (see the module docstring);
    returns the library changes since packing, in words (warned about by the caller)."""
    current = fingerprint_of(config, {}, "")
    diff = portable_differences(saved, current)
    if config.data.check_sources and not diff:
        if is_url(location):
            raise DataError(f"data.check_sources compares a pack with the raw files it was made from, on the machine "
                            f"that holds both; {location} is a URL: check it where it was packed")
        diff = pack_differences(config, Path(location), saved)
    if diff:
        raise DataError(f"the pack {location} does not match the config: {'; '.join(diff)}; "
                        "rebuild it with `mmfuse data pack --rebuild` (or `mmfuse train --rebuild-pack`)")
    changes = library_changes(saved.get("code"), current["code"])
    if changes and config.data.pack_strict_versions:
        raise DataError(f"the pack {location} was made with other library versions ({'; '.join(changes)}) and "
                        "data.pack_strict_versions is set: pack it again here, or unset it")
    return changes


@dataclass
class _Fetch:
    """Shard ``n`` of a split of a remote pack, as a local verified file (picklable, for loader workers)."""

    cache: PackCache
    names: list[str]
    indexes: list[ShardIndex]

    def __call__(self, number: int) -> Path:
        return self.cache.shard(self.names[number], self.indexes[number])


def open_pack(config: ExperimentConfig, location: str | Path) -> PreparedData:
    """The pack's splits and fitted preprocessing, after checking it fits this config (module docstring)."""
    where = str(location)
    state, raw = read_state(where)
    changes = check_pack(config, where, state["fingerprint"])
    if changes:
        log.warning("the pack %s was made with other library versions (%s); its shards are proven whole, but "
                    "tensors made here could differ slightly: set data.pack_strict_versions to refuse such a pack",
                    where, "; ".join(changes))
    shards = checked_shards(state.get("shards"), f"{where}/{PACK_FILE}")
    cache = None
    if is_url(where):
        limit = None if config.data.pack_cache_gb is None else int(config.data.pack_cache_gb * 2**30)
        cache = PackCache(where, raw, limit)
        preprocessor = Preprocessor.from_state(state["preprocessor"], cache.tokenizers(state.get("assets")))
    else:
        preprocessor = Preprocessor.from_state(state["preprocessor"], Path(where))
    task = TASKS.create(config.task.name, **config.task.options)
    task.load_state(state["task"])
    datasets: dict[str, MultimodalDataset] = {}
    recorded: dict[str, Any] = state["shard_sha256"] if isinstance(state.get("shard_sha256"), dict) else {}
    for name, shard_names in shards.items():
        if cache is None:
            folder = Path(where)
            datasets[name] = PackDataset([folder / shard for shard in shard_names], shard_report(folder, shard_names))
            continue
        indexes = [cache.index(shard, recorded.get(shard)) for shard in shard_names]
        datasets[name] = PackDataset([cache.folder / shard for shard in shard_names], report_of(indexes),
                                     indexes, _Fetch(cache, shard_names, indexes))
    return PreparedData(preprocessor, task, datasets)


def report_of(indexes: list[ShardIndex]) -> SkipReport:
    """The samples skipped while packing these shards, with their rows and reasons."""
    report = SkipReport()
    for index in indexes:
        for row in index.skipped:
            report.skipped.append(str(row.get("reason", "")))
            report.rows.append(row)
    return report


def shard_report(folder: Path, shard_names: list[str]) -> SkipReport:
    """``report_of`` the indexes of a local pack's shards."""
    return report_of([ShardIndex.read(folder / (shard + INDEX_SUFFIX)) for shard in shard_names])


__all__ = ["MAX_INDEX_BYTES", "check_pack", "open_pack", "read_state", "report_of", "shard_report"]
