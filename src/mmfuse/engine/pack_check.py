"""Does a finished pack match the config? Answered in memory that does not grow with the data set.

Why a module of its own: ``fingerprint`` (``mmfuse.engine.pack_fingerprint``) works on the records of
every split and the list of every input file, which is what packing needs anyway. A training start
needs only a yes or a list of differences, and at 200k samples those lists were the largest thing in
the process (about 500 MiB of ``Record``s and file entries, the whole difference between the peak RSS
of a run at 20k and at 200k samples). Here

- each split's records digest is hashed while the manifest is read row by row (``split_records``), a
  second read only where the validation split is carved out of train;
- when the records and preprocessing match, the input files are exactly the ones ``files.json`` lists
  (each record holds its files' absolute paths, so equal records name equal files): that list is
  read entry by entry and each file's stamp compared, re-hashing only files whose stamp changed.

The digests are the ones ``fingerprint`` computes (tested), so packs written before stay valid. When
the records differ, the full comparison runs to name what changed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmfuse.config import ExperimentConfig
from mmfuse.core.identity import file_digest
from mmfuse.engine.pack_fingerprint import (
    FILES_FILE,
    FileEntry,
    ListDigest,
    changed_files,
    differences,
    fingerprint,
    fingerprint_of,
    load_files,
    stamp_of,
)
from mmfuse.engine.records import load_records, new_preprocessor, split_records, validation_positions

CHUNK = 1 << 20


def record_digests(config: ExperimentConfig) -> dict[str, str]:
    """Per split, the digest ``fingerprint`` gives its records, from the manifest read row by row."""
    carved: list[int] = []
    if config.data.train is None or config.data.val is None:  # whether val is carved out of train: count first
        counts = Counter(split for split, _ in split_records(config))
        if "val" not in counts:
            carved = validation_positions(config, counts["train"])
    to_val = iter(carved)
    next_val = next(to_val, -1)
    digests: dict[str, ListDigest] = {}
    train_position = 0
    for split, record in split_records(config):
        if split == "train":
            if train_position == next_val:
                split, next_val = "val", next(to_val, -1)
            train_position += 1
        digests.setdefault(split, ListDigest()).add([record.id, record.fields, record.target])
    return {name: digest.hexdigest() for name, digest in digests.items()}


def file_entries(folder: Path) -> Iterator[FileEntry]:
    """The entries of ``files.json`` one at a time (the JSON list is decoded piece by piece)."""
    path = folder / FILES_FILE
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as handle:
        buffer, position, opened = "", 0, False
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n" + (",]" if opened else ""):
                if buffer[position] == "]":
                    return
                position += 1
            if position < len(buffer) and not opened:
                if buffer[position] != "[":
                    raise ValueError(f"{path}: not a list of file entries")
                opened, position = True, position + 1
                continue
            if position < len(buffer):
                try:
                    entry, end = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError:
                    entry = None  # an entry cut by the end of the chunk read so far: read on
                if entry is not None:
                    if not isinstance(entry, list) or len(entry) != 3:
                        raise ValueError(f"{path}: not a list of file entries")
                    yield entry
                    position = end
                    continue
            chunk = handle.read(CHUNK)
            if not chunk:
                raise ValueError(f"{path}: cut short")
            buffer, position = buffer[position:] + chunk, 0


def _files_digest(folder: Path) -> tuple[str, list[str]]:
    """The digest of the listed files as they are now, and the paths whose content changed."""
    digest, changed = ListDigest(), []
    for path, saved_digest, saved_stamp in file_entries(folder):
        stamp = stamp_of(path)
        now = saved_digest if stamp is not None and stamp == saved_stamp else file_digest(path)
        digest.add([path, now])
        if now != saved_digest:
            changed.append(str(path))
    return digest.hexdigest(), changed


def pack_differences(config: ExperimentConfig, folder: Path, saved: dict[str, Any]) -> list[str]:
    """What differs between the pack's fingerprint ``saved`` and this config's data, in words."""
    records = record_digests(config)
    if records == saved.get("records") and (folder / FILES_FILE).is_file():
        try:
            files, changed = _files_digest(folder)
        except (OSError, ValueError):
            pass  # an unreadable list: the full comparison below says what it can
        else:
            return differences(saved, fingerprint_of(config, records, files), changed)
    saved_files = load_files(folder)
    current, current_files = fingerprint(config, load_records(config), new_preprocessor(config), saved_files)
    return differences(saved, current, changed_files(saved_files, current_files))
