"""Clotho (Drossos et al. 2020) -> audio + caption rows, five per clip.

Layout followed (the Zenodo release): ``clotho_captions_{development,validation,evaluation}.csv``
with header ``file_name,caption_1,...,caption_5``; the audio is
``{development,validation,evaluation}/<file_name>`` under ``--media`` (default: the CSV folder; a
file found anywhere below it by its name is used too). development -> train, validation -> val,
evaluation -> test. Rows as ``caption_sets`` says.
"""

from __future__ import annotations

from pathlib import Path

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.caption_sets import add_caption, dict_rows, suggest_caption_config
from mmfuse.datasets.importers.media import AUDIO_SUFFIXES, MediaIndex
from mmfuse.datasets.importers.writer import ImportWriter

CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}


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
        for line_no, row in dict_rows(path, ["file_name", "caption_1"]):
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
                    add_caption(writer, split, found, f"{part}/{name}", caption,
                                 f"clotho-{part}-{Path(name).stem}-{key[8:]}")
    suggest_caption_config(writer, "clotho")
