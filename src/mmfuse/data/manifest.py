"""Reading a manifest (JSONL, CSV, TSV or Parquet) into ``Record``s.

One row is one sample: an id, any subset of the modality columns and (for training) a target.
A null, NaN or empty field means "this sample lacks the modality", never an error. Relative paths
resolve against the manifest's folder so a data set can be moved as a whole.

A null, empty or blank target means "no target" (``Record.target`` is None); whether that is an
error is the task's call. A number written as NaN or Infinity (JSON) stays a number, so that an
error can show the value as written instead of a missing one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmfuse.config import ModalitySpec
from mmfuse.core.errors import DataError, did_you_mean

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".pq")


@dataclass
class Record:
    """One manifest row. ``fields`` holds text or an absolute file path per modality, or None."""

    source: Path
    row: int
    id: str
    fields: dict[str, str | None]
    target: Any = None
    split: str | None = None

    @property
    def where(self) -> str:
        """Names the row in errors: 'manifest.jsonl row 12 (id s00012)'; row 0 = given directly."""
        if self.row <= 0:
            return f"input '{self.id}'"
        return f"{self.source.name} row {self.row} (id {self.id})"


def is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return list(_iter_jsonl(path))


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The rows one at a time: a manifest of 200k rows never sits in memory as raw dicts."""
    try:
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {line_no}: expected a JSON object")
                yield row
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None


def read_table(path: Path) -> list[dict[str, Any]]:
    """Raw rows of a manifest file, as dicts."""
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json manifest must be a list of objects")
            return data
        if suffix in (".csv", ".tsv"):
            # Only an empty cell is missing: text such as "NA" or "null" is data, not absence.
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                                keep_default_na=False, na_values=[""])
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unsupported manifest type '{suffix}' (use {', '.join(SUPPORTED_SUFFIXES)})")
    except DataError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    frame = frame.astype(object).where(frame.notna(), None)
    # Parquet list columns arrive as numpy arrays; tasks expect the plain lists JSONL gives.
    return [
        {str(key): value.tolist() if isinstance(value, np.ndarray) else value for key, value in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def _check_columns(path: Path, columns: set[str], required: list[str]) -> None:
    for column in required:
        if column not in columns:
            raise DataError(
                f"{path}: no column '{column}'{did_you_mean(column, columns)}; columns: {', '.join(sorted(columns))}"
            )


def _target(value: Any) -> Any:
    """None for a null, empty or blank target, else the value as read (a JSON NaN stays NaN).

    An empty label is 'no target' in every format (CSV already reads '' as missing); kept as ''
    it would be fitted as a class of its own.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value


def _resolve(value: Any, kind: str, base: Path) -> str | None:
    if is_empty(value):
        return None
    if kind == "text":
        return str(value)
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else (base / path))


def read_manifest(
    path: Path,
    modalities: dict[str, ModalitySpec],
    id_column: str = "id",
    target_column: str | None = "label",
    split_column: str | None = None,
) -> list[Record]:
    """Reads and checks a manifest; ``target_column=None`` when targets are not needed (predict).

    Only the columns of configured modalities are required to exist; a modality column that is
    absent from the whole file is an error (a typo would otherwise silently drop a modality).
    """
    return list(iter_manifest(path, modalities, id_column, target_column, split_column))


def iter_manifest(
    path: Path,
    modalities: dict[str, ModalitySpec],
    id_column: str = "id",
    target_column: str | None = "label",
    split_column: str | None = None,
) -> Iterator[Record]:
    """``read_manifest`` one record at a time (a JSONL file is also read row by row); the checks that need
    the whole file (columns present, not empty) run after its last row."""
    path = Path(path).resolve()
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    rows = _iter_jsonl(path) if path.suffix.lower() == ".jsonl" else iter(read_table(path))
    required = [spec.column for spec in modalities.values()]
    if target_column:
        required.append(target_column)
    if split_column:
        required.append(split_column)
    seen: set[str] = set()
    columns: set[str] = set()
    for index, row in enumerate(rows, start=1):
        columns.update(row)
        sample_id = row.get(id_column)
        sample_id = str(index - 1) if is_empty(sample_id) else str(sample_id)
        if sample_id in seen:
            raise DataError(f"{path.name} row {index}: duplicate id '{sample_id}'")
        seen.add(sample_id)
        yield Record(
            source=path,
            row=index,
            id=sample_id,
            fields={m: _resolve(row.get(spec.column), spec.kind, path.parent) for m, spec in modalities.items()},
            target=_target(row.get(target_column)) if target_column else None,
            split=None if not split_column or is_empty(row.get(split_column)) else str(row[split_column]).strip(),
        )
    if not seen:
        raise DataError(f"manifest {path} has no rows")
    _check_columns(path, columns, required)
