"""What the audio-caption importers (``audiocaps``, ``clotho``) share.

One manifest row per caption (``audio``, ``text``) with ``group`` = the clip, so retrieval counts
any of a clip's captions as a correct match: the example config uses ``group`` as the contrastive
task's label, so class-level recall is caption-to-clip recall. A clip not on disk is counted,
not fatal.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.writer import ImportWriter


def dict_rows(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV with a header holding ``required``; errors name the file."""
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


def add_caption(writer: ImportWriter, split: str, audio: Path, group: str, caption: str, caption_id: str) -> None:
    """One manifest row: the clip's absolute path, the caption, the clip as ``group``."""
    writer.add({"id": caption_id, "split": split, "audio": str(audio.resolve()), "text": caption.strip(),
                "group": group})


def suggest_caption_config(writer: ImportWriter, name: str) -> None:
    """Audio-text contrastive retrieval, labelled by clip so any of its captions counts."""
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
