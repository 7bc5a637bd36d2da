"""AudioSet segment CSVs + local clips (``--media``) -> multi-label rows.

Layout followed (``balanced_train_segments.csv``, ``unbalanced_train_segments.csv``,
``eval_segments.csv`` from research.google.com/audioset/download.html): three header lines
starting with ``#`` (the third names the columns ``YTID, start_seconds, end_seconds,
positive_labels``), then ``YTID, start, end, "/m/09x0r,/m/05zppz"`` with a space after each comma.
Split from the file name: ``eval`` -> test, anything else -> train. The optional
``class_labels_indices.csv`` (``--class-labels``, header ``index,mid,display_name``) maps mids to
display names; without it the label is the list of mids. Clips are found and written as
``clip_lists`` says; the example config is a ``multilabel`` task.
"""

from __future__ import annotations

from pathlib import Path

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.clip_lists import add_clip, csv_rows, media_index, suggest_clip_config
from mmfuse.datasets.importers.writer import ImportWriter


def _class_names(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    names: dict[str, str] = {}
    for line_no, fields in csv_rows(path):
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
    index = media_index(source, writer)
    names = _class_names(writer.options.class_labels)
    for path in files:
        split = "test" if "eval" in path.name else "train"
        for line_no, fields in csv_rows(path):
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
            add_clip(writer, index, fields[0].strip(), start, end, split, [names.get(m, m) for m in mids], where)
    suggest_clip_config(writer, {"name": "multilabel"}, "audioset")
