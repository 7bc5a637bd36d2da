"""VGGSound and AudioSet clip lists pointing at local clips (``--media``).

Layouts followed:

- **VGGSound** (``vggsound.csv`` from the VGGSound page, Chen et al. 2020): no header; one clip
  per line ``youtube_id,start_seconds,label,split`` with split ``train`` / ``test``; the label
  is a display name that may itself contain commas (then quoted).
- **AudioSet** (``balanced_train_segments.csv``, ``unbalanced_train_segments.csv``,
  ``eval_segments.csv`` from research.google.com/audioset/download.html): three header lines
  starting with ``#`` (the third names the columns ``YTID, start_seconds, end_seconds,
  positive_labels``), then ``YTID, start, end, "/m/09x0r,/m/05zppz"`` with a space after each
  comma. Split from the file name: ``eval`` -> test, anything else -> train. The optional
  ``class_labels_indices.csv`` (header ``index,mid,display_name``) maps mids to display names.

Clips are looked up in ``--media`` (default: the source's folder) by ``media.clip_stems``. The row
points at the file in column ``audio`` (.wav/.flac) or ``video`` (.mp4/.mkv/.webm). A clip not on
disk is counted, never fatal. The example config reads the audio files, and the video files'
frames and soundtrack where this mmfuse has the ``video`` modality (else those rows are left to
the user, as the report says). The label is the class name (VGGSound) or the list of class names
(AudioSet, multi-label).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.media import MediaIndex, clip_stems, media_column
from mmfuse.datasets.importers.writer import ImportWriter

CLIP_SECONDS = 10.0  # VGGSound and AudioSet clips are 10 s from the start time


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of a CSV, skipping blank lines and '#' comments."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                yield line_no, next(csv.reader([line], skipinitialspace=True))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _media(source: Path, writer: ImportWriter) -> MediaIndex:
    return MediaIndex(writer.options.media or (source if source.is_dir() else source.parent))


def _add_clip(writer: ImportWriter, index: MediaIndex, ytid: str, start: float, end: float | None,
              split: str, label: Any, where: str) -> None:
    path = index.find(clip_stems(ytid, start, end))
    if path is None:
        writer.skip("clip not found in the media folder", where)
        return
    writer.add({"id": f"{ytid}_{int(start * 1000)}", "split": split, media_column(path): str(path.resolve()),
                "label": label})


def video_modality_available() -> bool:
    """Whether this mmfuse has the ``video`` modality kind and audio tracks read from videos."""
    from typing import get_args

    from mmfuse.config.schema import ModalityKind, ModalitySpec

    return "video" in get_args(ModalityKind) and "from_video" in ModalitySpec.model_fields


def _suggest_audio(writer: ImportWriter, task: dict[str, Any], name: str) -> None:
    """Audio clips: an audio config. Video clips: frames + their soundtrack where mmfuse reads video."""
    columns = {key for row in writer.rows for key in row}
    modalities: dict[str, Any] = {}
    encoders: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if "video" in columns:
        if not video_modality_available():
            writer.note("the clips in column 'video' are video files and this mmfuse has no video modality: "
                        + ("the example config uses the audio files only" if "audio" in columns else
                           "no example config (extract their audio tracks to .wav and import again)"))
        else:
            modalities["video"] = {"kind": "video", "column": "video"}
            modalities["soundtrack"] = {"kind": "audio", "column": "video", "from_video": True}
            encoders["video"] = {"name": "video_frames", "frame_encoder": "image_cnn",
                                 "frame_options": {"dim": 32}, "dim": 128, "temporal": "transformer", "heads": 4}
            encoders["soundtrack"] = {"name": "audio_cnn", "dim": 128}
            data["video"] = {"frames": 8, "size": 64, "max_seconds": CLIP_SECONDS}
            data["on_error"] = "skip"  # a video without an audio track is counted, not fatal
    if "audio" in columns:
        modalities["audio"] = {"kind": "audio", "column": "audio"}
        encoders["audio"] = {"name": "audio_cnn", "dim": 128}
    if not modalities:
        return
    writer.suggest_config({
        "data": {"split_column": "split", "target_column": "label", "modalities": modalities,
                 "audio": {"sample_rate": 16000, "max_seconds": CLIP_SECONDS, "n_mels": 64, "hop_length": 320},
                 **data, "batch_size": 32},
        "encoders": encoders,
        "fusion": {"name": "concat", "out_dim": 128},
        "task": task,
        "optim": {"name": "adamw", "lr": 0.001},
        "trainer": {"max_epochs": 20, "patience": 5, "output_dir": f"runs/{name}"},
    }, f"Written by `mmfuse data import {name}`: {', '.join(modalities)} -> {task['name']}.\n"
       "Train with: mmfuse train -c config.yaml")


def import_vggsound(source: Path, writer: ImportWriter) -> None:
    """Imports ``vggsound.csv`` (the file, or a folder holding it)."""
    path = source / "vggsound.csv" if source.is_dir() else source
    index = _media(source, writer)
    for line_no, fields in _csv_rows(path):
        where = f"{path} line {line_no}"
        writer.seen()
        if len(fields) < 4:
            writer.problem(f"expected youtube_id,start_seconds,label,split, got {len(fields)} field(s)", where)
            continue
        ytid, start_text, split = fields[0].strip(), fields[1].strip(), fields[-1].strip()
        if line_no == 1 and ytid.lower().lstrip("# ") in ("youtube_id", "youtube id", "ytid"):
            continue  # a header some re-distributions add
        label = ",".join(fields[2:-1]).strip()
        try:
            start = float(start_text)
        except ValueError:
            writer.problem(f"start_seconds '{start_text}' is not a number", where)
            continue
        if not writer.room(split):
            continue
        _add_clip(writer, index, ytid, start, start + CLIP_SECONDS, split, label, where)
    _suggest_audio(writer, {"name": "classification"}, "vggsound")


def _class_names(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    names: dict[str, str] = {}
    for line_no, fields in _csv_rows(path):
        if fields[:2] == ["index", "mid"]:
            continue
        if len(fields) < 3:
            raise DataError(f"{path} line {line_no}: expected index,mid,display_name")
        names[fields[1].strip()] = ",".join(fields[2:]).strip()
    return names


def import_audioset(source: Path, writer: ImportWriter) -> None:
    """Imports AudioSet segment CSVs (one file, or every ``*_segments.csv`` in a folder)."""
    files = sorted(source.glob("*segments*.csv")) if source.is_dir() else [source]
    if not files:
        raise DataError(f"{source}: no *_segments.csv files (balanced_train_segments.csv, eval_segments.csv, ...)")
    index = _media(source, writer)
    names = _class_names(writer.options.class_labels)
    for path in files:
        split = "test" if "eval" in path.name else "train"
        for line_no, fields in _csv_rows(path):
            where = f"{path} line {line_no}"
            writer.seen()
            if len(fields) < 4:
                writer.problem("expected YTID, start_seconds, end_seconds, positive_labels, "
                               f"got {len(fields)} field(s)", where)
                continue
            try:
                start, end = float(fields[1]), float(fields[2])
            except ValueError:
                writer.problem(f"start/end seconds '{fields[1]}', '{fields[2]}' are not numbers", where)
                continue
            mids = [mid.strip() for mid in ",".join(fields[3:]).split(",") if mid.strip()]
            unknown = [mid for mid in mids if names and mid not in names]
            if unknown:
                writer.problem(f"label id(s) {', '.join(unknown)} not in {writer.options.class_labels}", where)
                continue
            if not writer.room(split):
                continue
            _add_clip(writer, index, fields[0].strip(), start, end, split, [names.get(m, m) for m in mids], where)
    _suggest_audio(writer, {"name": "multilabel"}, "audioset")
