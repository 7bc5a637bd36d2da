"""A pack written in parts, by many processes or machines at once, into one shared folder.

``mmfuse data pack --shard-index I --shard-count N`` packs only the shards at positions ``p`` of the
deterministic plan (``mmfuse.engine.pack._plan``: splits in sorted order, ``--shard-size`` records each)
with ``p % N == I``; a SLURM array (or any scheduler) runs I = 0..N-1 on as many machines, all writing
the same folder on a shared disk. ``mmfuse data pack --finalize`` (same config, ``--out`` and
``--shard-size``) then checks that every planned shard is there and whole, and writes ``files.json``,
the tokenizer files and ``pack.json``: the folder is byte for byte the pack one ``mmfuse data pack``
writes (each shard's bytes depend on its records alone, and the rest on the config and the data).

Why these rules:

- parts run together, so none takes the folder's exclusive lock: each holds its own lock file
  (``mmfuse.core.folder_lock.part_lock_name``), and first checks that no one holds the folder's
  (a whole pack or a finalize); finalizing takes the folder's lock, then refuses while any part's is
  held. Each side takes its own lock before looking at the other's, so both may refuse but never both
  go on.
- parts never delete: the first part records the pack's fingerprint in ``pack.partial.json`` (every
  part writes the same bytes); a part that finds another fingerprint there, or a finished pack of other
  data, refuses in one line instead of clearing shards that other parts may be writing.
- a killed part run again keeps its finished shards (as a whole pack does) and writes the rest.
- temporaries carry the host name (``mmfuse.core.atomic``), so one machine's cleanup never deletes
  another machine's shard in flight.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmfuse.config import ExperimentConfig
from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.errors import DataError
from mmfuse.core.folder_lock import LOCK_FILE, folder_lock, lock_holder, part_lock_name
from mmfuse.core.threads import usable_cores, whole_cores
from mmfuse.engine.interrupts import raise_on_signals
from mmfuse.engine.pack import (
    DEFAULT_SHARD_SIZE,
    PackResult,
    Progress,
    _finish,
    _finished,
    _plan,
    _run,
    check_pack_extra,
    refuse_parts,
)
from mmfuse.engine.pack_fingerprint import differences, fingerprint, load_files
from mmfuse.engine.pack_open import PARTIAL_FILE
from mmfuse.engine.pack_verify import PACK_FILE, read_json, shard_damage
from mmfuse.engine.records import fit_preprocessing, load_records, new_preprocessor

MAX_NAMED = 8
"""Missing shards named in a refusal; the rest are counted."""


def check_part(index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise DataError(f"--shard-index must be in 0..{count - 1} for --shard-count {count}, got {index}")


def pack_part(config: ExperimentConfig, folder: Path, index: int, count: int, workers: int | None = None,
              shard_size: int = DEFAULT_SHARD_SIZE, progress: Progress | None = None) -> PackResult:
    """Packs part ``index`` of ``count`` of the config's data into ``folder`` (module docstring); the pack
    is usable once ``finalize_pack`` ran after every part."""
    check_pack_extra()
    check_part(index, count)
    folder = Path(folder)
    what = f"packing part {index} of {count}"
    with folder_lock(folder, what, part_lock_name(index, count)), raise_on_signals():
        holder = lock_holder(folder / LOCK_FILE)
        if holder is not None:
            raise DataError(f"{folder} is being written by {holder} ({what} refused: wait for it to finish)")
        splits = load_records(config)
        current, _ = fingerprint(config, splits, new_preprocessor(config), load_files(folder))
        wanted = {"fingerprint": current, "shard_size": shard_size}
        saved = read_json(folder / PACK_FILE)
        if saved is not None:
            if differences(saved["fingerprint"], current, []) or saved.get("shard_size") != shard_size:
                raise DataError(f"{folder} holds a finished pack of other data, preprocessing or shard size; parts "
                                "never delete: use another folder, or pack it whole with `mmfuse data pack --rebuild`")
            return PackResult(folder, saved["counts"], saved["skipped"], already_packed=True)
        partial = read_json(folder / PARTIAL_FILE)
        if partial is None:
            write_text_atomic(folder / PARTIAL_FILE, json.dumps(wanted))  # same bytes from every part
        elif partial != wanted:
            raise DataError(f"{folder} holds an unfinished pack of other data, preprocessing or shard size "
                            f"({PARTIAL_FILE}); parts never delete another pack's shards: use another folder, or "
                            "clear it with `mmfuse data pack --rebuild` when no part runs")
        preprocessor, task = fit_preprocessing(config, splits)
        mine = [shard for position, shard in enumerate(_plan(splits, shard_size)) if position % count == index]
        todo = [shard for shard in mine if not _finished(folder, shard)]
        total = sum(len(s.records) for s in mine)
        done = total - sum(len(s.records) for s in todo)
        if progress:
            progress(done, total)
        _run(todo, (preprocessor, task, config.data.on_error, folder), workers or whole_cores(usable_cores()),
             lambda n: progress(n, total) if progress else None, done)
        counts: dict[str, int] = {}
        for shard in mine:
            counts[shard.split] = counts.get(shard.split, 0) + len(shard.records)
        return PackResult(folder, counts, {}, shards_written=len(todo), shards_kept=len(mine) - len(todo))


def finalize_pack(config: ExperimentConfig, folder: Path, shard_size: int = DEFAULT_SHARD_SIZE) -> PackResult:
    """Writes ``files.json``, the tokenizer files and ``pack.json`` once every part's shards are whole;
    refused, naming the missing shards, while any is not (or while a part still runs)."""
    folder = Path(folder)
    with folder_lock(folder, "finalizing the pack"):
        refuse_parts(folder, "finalizing")
        splits = load_records(config)
        current, files = fingerprint(config, splits, new_preprocessor(config), load_files(folder))
        saved = read_json(folder / PACK_FILE)
        if saved is not None and not differences(saved["fingerprint"], current, []):
            return PackResult(folder, saved["counts"], saved["skipped"], already_packed=True)
        if read_json(folder / PARTIAL_FILE) != {"fingerprint": current, "shard_size": shard_size}:
            raise DataError(f"{folder} holds no parts of this pack (no {PARTIAL_FILE} of this data, preprocessing and "
                            f"--shard-size {shard_size}): run the parts first, with the same config and --shard-size")
        plan = _plan(splits, shard_size)
        missing = [why for shard in plan if (why := shard_damage(folder, shard.name)) is not None]
        if missing:
            more = f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
            raise DataError(f"{len(missing)} of {len(plan)} shards of {folder} are not packed yet: "
                            f"{'; '.join(missing[:MAX_NAMED])}{more}; run their parts (again) first")
        preprocessor, task = fit_preprocessing(config, splits)
        preprocessor.save_assets(folder)
        return _finish(config, folder, plan, current, files, preprocessor, task, len(plan), 0, shard_size)
