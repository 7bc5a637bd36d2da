"""AudioCaps and Clotho: audio clips with several human captions each.

Layouts followed:

- **AudioCaps** (cdjkim/audiocaps, ``dataset/{train,val,test}.csv``): header
  ``audiocap_id,youtube_id,start_time,caption``; one caption per line (train: one per clip;
  val/test: five lines per clip, one ``audiocap_id`` each). Clips are 10 s from ``start_time``,
  looked up in ``--media`` (default: the CSV folder) by ``media.clip_stems`` and also as
  ``{audiocap_id}.*``. Split from the file name (train / val / test).
- **Clotho** (Drossos et al. 2020, Zenodo release): ``clotho_captions_{development,validation,
  evaluation}.csv`` with header ``file_name,caption_1,...,caption_5``; the audio is
  ``{development,validation,evaluation}/<file_name>`` under ``--media`` (default: the CSV folder;
  a file found anywhere below it by its name is used too). development -> train,
  validation -> val, evaluation -> test.

One manifest row per caption (``audio``, ``text``) with ``group`` = the clip, so retrieval counts
any of a clip's captions as a correct match (the example config uses ``group`` as the
contrastive task's label: class-level recall is then caption-to-clip recall). A clip not on
disk is counted, not fatal.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.media import AUDIO_SUFFIXES, MediaIndex, clip_stems
from mmfuse.datasets.importers.writer import ImportWriter

AUDIOCAPS_FILES = {"train.csv": "train", "val.csv": "val", "test.csv": "test"}
CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}


def _dict_rows(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                header = ", ".join(reader.fieldnames or [])
                raise DataError(f"{path}: no column(s) {', '.join(missing)}; header: {header}")
            return [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _add_caption(writer: ImportWriter, split: str, audio: Path, group: str, caption: str, caption_id: str) -> None:
    writer.add({"id": caption_id, "split": split, "audio": str(audio.resolve()), "text": caption.strip(),
                "group": group})


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
        for line_no, row in _dict_rows(path, ["audiocap_id", "youtube_id", "start_time", "caption"]):
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
            _add_caption(writer, split, audio, clip, row["caption"], f"ac{row['audiocap_id'].strip()}")
    _suggest(writer, "audiocaps")


def import_clotho(source: Path, writer: ImportWriter) -> None:
    """Imports Clotho's caption CSVs (a folder holding them, or one of them)."""
    files = (sorted(source.glob("clotho_captions_*.csv")) if source.is_dir() else [source])
    if not files:
        raise DataError(f"{source}: no clotho_captions_*.csv files")
    root = writer.options.media or files[0].parent
    index = MediaIndex(root, AUDIO_SUFFIXES)
    for path in files:
        part = path.stem.removeprefix("clotho_captions_")
        split = CLOTHO_SPLITS.get(part, part)
        for line_no, row in _dict_rows(path, ["file_name", "caption_1"]):
            where = f"{path} line {line_no}"
            writer.seen()
            name = (row.get("file_name") or "").strip()
            if not name:
                writer.problem("empty file_name", where)
                continue
            if not writer.room(split):
                continue
            audio = root / part / name
            found = audio if audio.is_file() else index.by_name.get(name)
            if found is None:
                writer.skip("clip not found in the media folder", where)
                continue
            captions = [(key, (row.get(key) or "").strip()) for key in sorted(row) if key.startswith("caption_")]
            for key, caption in captions:
                if caption:
                    _add_caption(writer, split, found, f"{part}/{name}", caption,
                                 f"clotho-{part}-{Path(name).stem}-{key[8:]}")
    _suggest(writer, "clotho")


def _suggest(writer: ImportWriter, name: str) -> None:
    config: dict[str, Any] = {
        "data": {"split_column": "split", "target_column": "group",
                 "modalities": {"audio": {"kind": "audio", "column": "audio"},
                                "text": {"kind": "text", "column": "text"}},
                 "text": {"max_length": 32},
                 "audio": {"sample_rate": 16000, "max_seconds": 10.0, "n_mels": 64, "hop_length": 320},
                 "batch_size": 64},
        "encoders": {"audio": {"name": "audio_cnn", "dim": 128}, "text": {"name": "text_gru", "dim": 128}},
        "task": {"name": "contrastive", "dim": 128, "pairs": "all"},
        "optim": {"name": "adamw", "lr": 0.001},
        "trainer": {"max_epochs": 20, "patience": 5, "output_dir": f"runs/{name}"},
    }
    writer.suggest_config(config, f"Written by `mmfuse data import {name}`: audio-text retrieval. target_column is\n"
                                  "the clip (group), so class-level recall counts any caption of the clip.\n"
                                  "Train with: mmfuse train -c config.yaml")
