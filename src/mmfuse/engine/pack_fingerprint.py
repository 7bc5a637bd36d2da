"""What a pack (``mmfuse.engine.pack``) is a function of, and what differs when it no longer matches.

The fingerprint holds the preprocessing settings, the task, mmfuse's preprocessing version
(``PREPROCESSING_VERSION``), the records of each split (ids, fields, targets: a re-split or an
edited manifest differs), the SHA-256 of every referenced file's bytes, and the library versions
and code that turn records into tensors (``preprocessing_identity``). The fitted vocabulary and
labels follow from these; ``pack.json`` stores them beside it, with every shard's SHA-256.

Two kinds of difference, because a pack must travel (packed on one machine, trained on a cluster):

- what decides the tensors' meaning: the preprocessing settings, the task, the format and the
  preprocessing version (and, with ``--check-sources``, the records and input files). A mismatch is
  refused (``differences``): the model would read tensors made another way.
- the exact library versions and code hash (``library_changes``): a newer torch or Pillow usually
  gives the same tensors, so these are recorded, warned about and refused only on request
  (``data.pack_strict_versions``). The shards' own digests prove the bytes whatever made them.

Hashing every input file at every training start would read the whole raw data set, which is what a
pack exists to avoid. ``files.json`` therefore keeps each file's ``stat_stamp`` (device, inode, size,
mtime, ctime) with its digest, and a file whose stamp is unchanged keeps its digest; any other file
(rewritten, even with its mtime restored, which changes ctime; or copied elsewhere) is hashed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmfuse.config import ExperimentConfig
from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.identity import file_digest, stat_stamp
from mmfuse.data.manifest import Record
from mmfuse.data.memory import preprocessing_identity, referenced_files
from mmfuse.data.pack_format import FORMAT, READABLE_FORMATS
from mmfuse.data.preprocess import Preprocessor

FILES_FILE = "files.json"
PREPROCESSING_VERSION = 1
"""mmfuse's version of the record -> tensor recipe. Bump it in the change that makes the same records and
settings give other tensors (a new resampler, another mel scale): packs of the old recipe are then
refused instead of silently read as the new one. ``tests/test_pack_portable.py`` pins the tensors of
a fixed sample to this number, so such a change fails there until it is bumped."""
PREPROCESSING_FIELDS = {"modalities", "text", "image", "audio", "features", "on_error", "id_column", "target_column"}
"""The ``data`` settings that shape the packed tensors (batch size, workers and the like do not)."""

FileEntry = list[Any]
"""[path, SHA-256 or None when unreadable, stat stamp or None]."""


def _sha(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class ListDigest:
    """``_sha(list(items))`` without building the list or its JSON text: the same bytes are hashed piece
    by piece (``json.dumps`` writes a list as '[' + items joined by ', ' + ']'), so a 200k-sample pack
    does not hold a copy of every record as one string, and existing packs keep their fingerprint."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256(b"[")
        self._empty = True

    def add(self, item: object) -> None:
        if not self._empty:
            self._digest.update(b", ")
        self._empty = False
        self._digest.update(json.dumps(item, sort_keys=True, default=str).encode())

    def hexdigest(self) -> str:
        final = self._digest.copy()
        final.update(b"]")
        return final.hexdigest()


def _sha_of_list(items: Iterable[object]) -> str:
    digest = ListDigest()
    for item in items:
        digest.add(item)
    return digest.hexdigest()


def stamp_of(path: str) -> list[int] | None:
    try:
        return list(stat_stamp(path))
    except OSError:
        return None


def input_files(records: list[Record], preprocessor: Preprocessor, known: list[FileEntry] | None = None,
                ) -> list[FileEntry]:
    """Every file the records reference (a row-referenced array file once), sorted, with digest and stamp."""
    cached = {str(e[0]): e for e in known or [] if len(e) == 3 and e[2] is not None}
    out: list[FileEntry] = []
    for path in referenced_files(records, preprocessor):
        stamp = stamp_of(path)
        entry = cached.get(path)
        digest = entry[1] if entry is not None and stamp is not None and entry[2] == stamp else file_digest(path)
        out.append([path, digest, stamp])
    return out


def _video_fields(config: ExperimentConfig) -> set[str]:
    """``data.video`` shapes the tensors only when a modality is a video (other packs keep their fingerprint)."""
    return {"video"} if any(spec.kind == "video" for spec in config.data.modalities.values()) else set()


def fingerprint(config: ExperimentConfig, splits: dict[str, list[Record]], preprocessor: Preprocessor,
                known: list[FileEntry] | None = None) -> tuple[dict[str, Any], list[FileEntry]]:
    """The pack's fingerprint for this config and records, and the input files it covers."""
    files = input_files([r for records in splits.values() for r in records], preprocessor, known)
    records = {name: _sha_of_list([r.id, r.fields, r.target] for r in records) for name, records in splits.items()}
    return fingerprint_of(config, records, _sha_of_list(entry[:2] for entry in files)), files


def fingerprint_of(config: ExperimentConfig, records: dict[str, str], files: str) -> dict[str, Any]:
    """The fingerprint from the digests of each split's records and of the input files' list."""
    return {
        "format": FORMAT,
        "preprocessing": config.data.model_dump(mode="json", include=PREPROCESSING_FIELDS | _video_fields(config)),
        "task": {"name": config.task.name, "options": config.task.options},
        "records": records,
        "files": files,
        "version": PREPROCESSING_VERSION,
        "code": preprocessing_identity(),
    }


def changed_files(saved_files: list[FileEntry] | None, current_files: list[FileEntry]) -> list[str]:
    """The paths whose digest differs between the two lists, or that only the saved one has."""
    before = {str(e[0]): e[1] for e in saved_files or []}
    now = {str(e[0]) for e in current_files}
    return [str(e[0]) for e in current_files if before.get(str(e[0]), "absent") != e[1]] + \
        [p for p in before if p not in now]


def differences(saved: dict[str, Any], current: dict[str, Any], changed: list[str]) -> list[str]:
    """What differs between a pack's fingerprint and the config's, in words (empty when they match);
    ``changed`` names the input files that differ (``changed_files``)."""
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, 1 if key == "version" else None), current.get(key)
        if old == new or key == "code":  # library versions: ``library_changes``
            continue
        if key == "preprocessing" and isinstance(old, dict) and isinstance(new, dict):
            out += [f"data.{k}: {old.get(k)!r} in the pack, {new.get(k)!r} in the config"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif key == "files":
            out.append(f"input files changed since packing: {', '.join(changed[:3]) or 'unknown'}"
                       + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
        elif key == "records":
            splits = sorted(s for s in set(old or {}) | set(new or {}) if (old or {}).get(s) != (new or {}).get(s))
            out.append(f"the manifest rows of {', '.join(splits)} differ")
        elif key == "version":
            out.append(f"the pack was made by mmfuse's preprocessing version {old!r}, this mmfuse reads version "
                       f"{new!r} (the same records now give other tensors)")
        else:
            out.append(f"{key}: {old!r} in the pack, {new!r} in the config")
    return out


def portable_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs in the parts of the fingerprint that a pack carries wherever it goes (preprocessing,
    task, format, preprocessing version): the check every training start makes, raw files or not."""
    keys = ("format", "preprocessing", "task", "version")
    readable = {k: saved.get(k) for k in keys if k in saved}
    if readable.get("format") in READABLE_FORMATS:  # an older layout of the same tensors reads as it is
        readable["format"] = current["format"]
    return differences(readable, {k: current[k] for k in keys}, [])


def library_changes(saved: Any, current: dict[str, Any]) -> list[str]:
    """The library versions (and preprocessing code) that differ between packing and now, in words."""
    saved = saved if isinstance(saved, dict) else {}
    before, now = saved.get("libraries") or {}, current.get("libraries") or {}
    out = [f"{name} {before.get(name) or 'absent'} at packing, {now.get(name) or 'absent'} here"
           for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
    if saved.get("code") != current.get("code") and not out:
        out.append("mmfuse's preprocessing code differs from the code that packed it")
    return out


def write_files(folder: Path, files: list[FileEntry]) -> None:
    write_text_atomic(folder / FILES_FILE, json.dumps(files))


def load_files(folder: Path) -> list[FileEntry] | None:
    """The input files recorded by a pack, or None (no pack there, or an unreadable list)."""
    try:
        return list(json.loads((folder / FILES_FILE).read_text()))
    except (OSError, ValueError):
        return None
