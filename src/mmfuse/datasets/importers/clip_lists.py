"""What the clip-list importers (``vggsound``, ``audioset-csv``) share.

Both list YouTube clips (id + start time) rather than files: rows are read as CSV with ``#``
comment lines skipped, each clip is looked up in the media folder by ``media.clip_stems``, and the
row points at the file in column ``audio`` (.wav/.flac) or ``video`` (.mp4/.mkv/.webm). A clip not
on disk is counted, never fatal. The example config reads the audio files, and the video files'
frames and soundtrack where this mmfuse has the ``video`` modality (else those rows are left to
the user, as the report says).
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


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of a CSV, skipping blank lines and '#' comments."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                yield line_no, next(csv.reader([line], skipinitialspace=True))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def media_index(source: Path, writer: ImportWriter) -> MediaIndex:
    """The clips under ``--media``, else under the source's folder."""
    return MediaIndex(writer.options.media or (source if source.is_dir() else source.parent))


def add_clip(writer: ImportWriter, index: MediaIndex, ytid: str, start: float, end: float | None,
              split: str, label: Any, where: str) -> None:
    """One row for the clip's file (``audio`` or ``video`` column), or a counted skip."""
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


def suggest_clip_config(writer: ImportWriter, task: dict[str, Any], name: str) -> None:
    """Audio clips: an audio config. Video clips: frames + their soundtrack where mmfuse reads video."""
    columns = {key for row in writer.rows for key in row}
    modalities: dict[str, Any] = {}
    encoders: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if "video" in columns:
        if not video_modality_available():
            writer.note("the clips in column 'video' are video files and this mmfuse has no video modality: "
                        + ("the example config uses the audio files only (data.on_error: skip leaves the "
                           "video rows out of training, counted)" if "audio" in columns else
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
    if set(modalities) == {"audio"} and "video" in columns:
        data["on_error"] = "skip"  # rows of video files have no modality this config reads
    writer.suggest_config({
        "data": {"split_column": "split", "target_column": "label", "modalities": modalities,
                 "audio": {"sample_rate": 16000, "max_seconds": CLIP_SECONDS, "n_mels": 64, "hop_length": 320},
                 **data, "batch_size": 32},
        "encoders": encoders,
        "fusion": {"name": "concat"},
        "task": task,
        "optim": {"name": "adamw", "lr": 0.001},
        "trainer": {"max_epochs": 20, "patience": 5, "output_dir": f"runs/{name}"},
    }, f"Written by `mmfuse data import {name}`: {', '.join(modalities)} -> {task['name']}.\n"
       "Train with: mmfuse train -c config.yaml")
