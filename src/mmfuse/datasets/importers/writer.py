"""What every importer shares: the options, the manifest writer and the import report.

An importer reads a published data set and calls ``ImportWriter.add`` once per manifest row,
``skip`` for a source row it leaves out on purpose (a class outside the chosen set, a clip not on
disk) and ``problem`` for a row it cannot read (``--on-error raise`` stops there, naming the file
and row; ``skip`` counts it). Rows land in ``manifest.jsonl`` (``id``, ``split``, ``label`` and
one column per modality); arrays and media the importer writes go beside it and are referenced relative to
it, so the folder moves as a whole. ``import_report.json`` records what was read, written and
skipped (counts per reason, the first few rows of each), and an example config is written when
the importer can suggest one.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.errors import DataError

MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "import_report.json"
CONFIG_NAME = "config.yaml"
_EXAMPLES_PER_REASON = 5


@dataclass
class ImportOptions:
    """Every importer option; each format declares which ones it reads (``ImporterSpec.options``)."""

    limit: int | None = None
    on_error: Literal["raise", "skip"] = "raise"
    images: Path | None = None
    karpathy: Path | None = None
    media: Path | None = None
    class_labels: Path | None = None
    all_classes: bool = False
    test_session: int = 5
    text_column: str | None = None
    label_column: str | None = None
    image_column: str | None = None
    audio_column: str | None = None


@dataclass
class ImportReport:
    """What an import did; written as ``import_report.json`` beside the manifest."""

    format: str
    source: str
    manifest: str = ""
    config: str | None = None
    read: int = 0
    written: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """The printed summary: counts per split, then per skip reason."""
        splits = ", ".join(f"{split} {count}" for split, count in sorted(self.splits.items()))
        lines = [f"read {self.read} source rows, wrote {self.written} manifest rows ({splits})"]
        lines += [f"skipped {count}: {reason}" for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1])]
        lines += [f"kept without {reason}: {count}" for reason, count in sorted(self.missing.items())]
        return lines + list(self.notes)


class ImportWriter:
    """Collects manifest rows and arrays under ``folder`` (the staging folder of the import)."""

    def __init__(self, folder: Path, fmt: str, source: Path, options: ImportOptions) -> None:
        self.folder, self.options = folder, options
        self.report = ImportReport(format=fmt, source=str(source))
        self.rows: list[dict[str, Any]] = []
        self._split_counts: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()
        self._missing: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = defaultdict(list)
        self._ids: set[str] = set()
        self.config: dict[str, Any] | None = None
        self.config_comment = ""

    # ---- rows -----------------------------------------------------------------------------------
    def seen(self, count: int = 1) -> None:
        """Counts source rows read (written or not)."""
        self.report.read += count

    def room(self, split: str) -> bool:
        """False once ``--limit`` rows of ``split`` are written: the importer can stop reading it."""
        return self.options.limit is None or self._split_counts[split] < self.options.limit

    def add(self, row: dict[str, Any]) -> bool:
        """Adds one manifest row (needs ``id`` and ``split``); False when the split is full."""
        split = str(row["split"])
        if not self.room(split):
            return False
        row_id = str(row["id"])
        if row_id in self._ids:
            raise DataError(f"two source rows give the manifest id '{row_id}'; ids must be unique")
        self._ids.add(row_id)
        self.rows.append(row)
        self._split_counts[split] += 1
        return True

    def skip(self, reason: str, where: str) -> None:
        """Counts a source row left out on purpose (never an error)."""
        self._skipped[reason] += 1
        if len(self._examples[reason]) < _EXAMPLES_PER_REASON:
            self._examples[reason].append(where)

    def problem(self, reason: str, where: str) -> None:
        """A row that cannot be read: an error naming ``where`` unless ``--on-error skip``."""
        if self.options.on_error == "raise":
            raise DataError(f"{where}: {reason} (--on-error skip leaves such rows out and counts them)")
        self.skip(reason, where)

    def missing(self, what: str) -> None:
        """Counts a row kept without one modality (e.g. 'audio: file not found')."""
        self._missing[what] += 1

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    # ---- files ----------------------------------------------------------------------------------
    # The output folder is a private staging folder that lands whole (``staged_folder``), so files
    # in it are written directly: a per-file atomic rename would scan the folder for stale
    # temporaries on every write, quadratic in the tens of thousands of files MOSEI gives.
    def _target(self, relative: str) -> Path:
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save_array(self, relative: str, array: np.ndarray) -> str:
        """Writes ``array`` as .npy at ``relative`` under the output folder; returns ``relative``."""
        with self._target(relative).open("wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        return relative

    def save_bytes(self, relative: str, data: bytes) -> str:
        """Writes a media file (image/audio bytes) under the output folder; returns ``relative``."""
        self._target(relative).write_bytes(data)
        return relative

    def suggest_config(self, config: dict[str, Any], comment: str) -> None:
        """The example config to write beside the manifest (``data.manifest`` is filled in)."""
        self.config, self.config_comment = config, comment

    # ---- finish ---------------------------------------------------------------------------------
    def finish(self, final_folder: Path) -> ImportReport:
        """Writes manifest, example config and report into the staging folder; returns the report.

        Paths in the report name ``final_folder``, where the staging folder is about to land.
        """
        report = self.report
        if not self.rows:
            reasons = "; ".join(f"{reason}: {count}" for reason, count in self._skipped.most_common(3))
            raise DataError(f"{report.source}: no rows to import (read {report.read}"
                            + (f"; skipped {reasons}" if reasons else "") + ")")
        write_text_atomic(self.folder / MANIFEST_NAME, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                               for row in self.rows))
        report.manifest = str(final_folder / MANIFEST_NAME)
        report.written = len(self.rows)
        report.splits = dict(sorted(self._split_counts.items()))
        report.skipped = dict(self._skipped.most_common())
        report.skipped_examples = {reason: list(self._examples[reason]) for reason in report.skipped}
        report.missing = dict(sorted(self._missing.items()))
        report.columns = sorted({key for row in self.rows for key in row})
        if self.config is not None:
            config = {"seed": 0, **self.config}
            config["data"] = {"manifest": MANIFEST_NAME, **config["data"]}
            header = "".join(f"# {line}\n" if line else "#\n" for line in self.config_comment.splitlines())
            write_text_atomic(self.folder / CONFIG_NAME, header + yaml.safe_dump(config, sort_keys=False))
            report.config = str(final_folder / CONFIG_NAME)
        write_text_atomic(self.folder / REPORT_NAME, json.dumps(asdict(report), indent=2) + "\n")
        return report
