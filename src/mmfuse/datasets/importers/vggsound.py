"""VGGSound (Chen et al. 2020): ``vggsound.csv`` + local clips (``--media``) -> label rows.

Layout followed (``vggsound.csv`` from the VGGSound page): no header; one clip per line
``youtube_id,start_seconds,label,split`` with split ``train`` / ``test``; the label is a display
name that may itself contain commas (then quoted). A header line some re-distributions add is
tolerated. Clips are found and written as ``clip_lists`` says; the label is the class name and
the example config a ``classification``.
"""

from __future__ import annotations

from pathlib import Path

from mmfuse.datasets.importers.clip_lists import CLIP_SECONDS, add_clip, csv_rows, media_index, suggest_clip_config
from mmfuse.datasets.importers.writer import ImportWriter


def import_vggsound(source: Path, writer: ImportWriter) -> None:
    """Imports ``vggsound.csv`` (the file, or a folder holding it)."""
    path = source / "vggsound.csv" if source.is_dir() else source
    index = media_index(source, writer)
    for line_no, fields in csv_rows(path):
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
        add_clip(writer, index, ytid, start, start + CLIP_SECONDS, split, label, where)
    suggest_clip_config(writer, {"name": "classification"}, "vggsound")
