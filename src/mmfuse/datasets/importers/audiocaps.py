"""AudioCaps (Kim et al. 2019) -> audio + caption rows grouped by clip.

Layout followed (cdjkim/audiocaps, ``dataset/{train,val,test}.csv``): header
``audiocap_id,youtube_id,start_time,caption``; one caption per line (train: one per clip;
val/test: five lines per clip, one ``audiocap_id`` each). Clips are 10 s from ``start_time``,
looked up in ``--media`` (default: the CSV folder) as ``{audiocap_id}.*`` (any of the clip's
captions' ids) and by ``media.clip_stems``. Split from the file name (train / val / test). Rows
as ``caption_sets`` says.
"""

from __future__ import annotations

from pathlib import Path

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.caption_sets import add_caption, dict_rows, suggest_caption_config
from mmfuse.datasets.importers.media import AUDIO_SUFFIXES, MediaIndex, clip_stems
from mmfuse.datasets.importers.writer import ImportWriter

AUDIOCAPS_FILES = {"train.csv": "train", "val.csv": "val", "test.csv": "test"}


def import_audiocaps(source: Path, writer: ImportWriter) -> None:
    """Imports AudioCaps' train/val/test.csv (a folder holding them, or one of them)."""
    files = [source / name for name in AUDIOCAPS_FILES if (source / name).is_file()] if source.is_dir() else [source]
    if not files:
        raise DataError(f"{source}: no train.csv, val.csv or test.csv")
    index = MediaIndex(writer.options.media or files[0].parent, AUDIO_SUFFIXES)
    for path in files:
        split = AUDIOCAPS_FILES.get(path.name, path.stem)
        readable: list[tuple[str, dict[str, str], str]] = []
        ids_of_clip: dict[str, list[str]] = {}
        for line_no, row in dict_rows(path, ["audiocap_id", "youtube_id", "start_time", "caption"]):
            where = f"{path} line {line_no}"
            writer.seen()
            try:
                start = float(row["start_time"])
            except (TypeError, ValueError):
                writer.problem(f"start_time '{row['start_time']}' is not a number", where)
                continue
            if not (row.get("caption") or "").strip():
                writer.problem("empty caption", where)
                continue
            clip = f"{row['youtube_id'].strip()}_{int(start * 1000)}"
            readable.append((where, row, clip))
            ids_of_clip.setdefault(clip, []).append(row["audiocap_id"].strip())
        # A clip's file may be named after any one of its captions' audiocap_ids (val/test have five).
        found: dict[str, Path | None] = {}
        for where, row, clip in readable:
            if not writer.room(split):
                break
            if clip not in found:
                ytid, start = row["youtube_id"].strip(), float(row["start_time"])
                found[clip] = index.find([*ids_of_clip[clip], *clip_stems(ytid, start, start + 10.0)])
            audio = found[clip]
            if audio is None:
                writer.skip("clip not found in the media folder", where)
                continue
            add_caption(writer, split, audio, clip, row["caption"], f"ac{row['audiocap_id'].strip()}")
    suggest_caption_config(writer, "audiocaps")
