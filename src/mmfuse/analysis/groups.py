"""Metrics per group of a manifest column (``mmfuse evaluate --by COLUMN``): per question type,
per speaker, per source.

The column is read from the evaluated manifest's rows; it need not be a modality or the target.
A row whose cell is empty or absent goes to the group ``(missing)``, listed last; the others are
sorted by name. Each group is scored exactly as the whole set is, on its samples alone: a group's
metrics equal ``mmfuse evaluate`` on a manifest holding only that group's rows. With
``--robustness`` every group also gets its missing-modality subsets and modality importance
(``missing_subsets_by_COLUMN.csv``, ``importance_by_COLUMN.csv``); the noise study, by far the
slowest, stays on the whole set.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

from mmfuse.analysis.importance import ImportanceResult, shapley_importance
from mmfuse.analysis.noise import decode_records
from mmfuse.analysis.subsets import CachedRunner, MissingSubsetsResult, missing_subsets
from mmfuse.core.atomic import atomic_file
from mmfuse.core.errors import DataError, did_you_mean
from mmfuse.data.dataset import MultimodalDataset
from mmfuse.data.manifest import Record, is_empty, read_manifest, read_table
from mmfuse.engine.evaluate import evaluate
from mmfuse.model import MultimodalModel

MISSING_GROUP = "(missing)"


def manifest_groups(manifest: Path, column: str, id_column: str = "id") -> dict[str, str]:
    """Sample id -> group (the cell's text) for every row of ``manifest``.

    Ids follow ``read_manifest`` (the id column, else the row index), so they match the samples.
    A column found in no row at all is an error naming the columns there are: a typo would
    otherwise put every sample in ``(missing)``.
    """
    rows = read_table(Path(manifest))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if column not in columns:
        raise DataError(f"{manifest}: no column '{column}' to group by{did_you_mean(column, columns)}; "
                        f"columns: {', '.join(columns)}")
    records = read_manifest(Path(manifest), {}, id_column=id_column, target_column=None)
    return {r.id: _group_name(rows[r.row - 1].get(column)) for r in records}


def _group_name(value: Any) -> str:
    if is_empty(value):
        return MISSING_GROUP
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 3.0 from a numeric column reads as 3
    return str(value)


def group_order(names: set[str] | list[str]) -> list[str]:
    return sorted(set(names) - {MISSING_GROUP}) + ([MISSING_GROUP] if MISSING_GROUP in names else [])


@dataclass
class GroupMetrics:
    group: str
    samples: int
    metrics: dict[str, float]


def split_by_group(dataset: MultimodalDataset, groups: dict[str, str]) -> dict[str, MultimodalDataset]:
    """The dataset's samples per group, in ``group_order``; a sample id missing from ``groups`` is an error."""
    members: dict[str, list[Any]] = {}
    for sample in dataset.samples:
        if sample.id not in groups:
            raise DataError(f"sample '{sample.id}' is not in the manifest that gives the groups")
        members.setdefault(groups[sample.id], []).append(sample)
    subsets = {}
    for name in group_order(list(members)):
        subset = MultimodalDataset([], None, None)  # type: ignore[arg-type]  # filled with built samples
        subset.samples = members[name]
        subsets[name] = subset
    return subsets


def evaluate_by_group(model: MultimodalModel, dataset: MultimodalDataset, groups: dict[str, str]) -> list[GroupMetrics]:
    return [GroupMetrics(name, len(subset), evaluate(model, subset))
            for name, subset in split_by_group(dataset, groups).items()]


def groups_table(column: str, results: list[GroupMetrics]) -> Table:
    names = list(results[0].metrics) if results else []
    table = Table(title=f"by {column}")
    for heading in (column, "samples", *names):
        # the group names must stay readable: a narrow terminal squeezes the numbers first
        table.add_column(heading, justify="left" if heading == column else "right", no_wrap=heading == column)
    for r in results:
        table.add_row(r.group, str(r.samples), *(f"{r.metrics[n]:.4f}" for n in names))
    return table


def groups_json(column: str, results: list[GroupMetrics]) -> dict[str, Any]:
    """The ``groups`` entry of ``evaluate --json``: {column, values: {group: {samples, metrics}}}."""
    return {"column": column, "values": {r.group: {"samples": r.samples, "metrics": r.metrics} for r in results}}


# ---- robustness per group ---------------------------------------------------------------------


@dataclass
class GroupRobustness:
    group: str
    samples: int
    subsets: MissingSubsetsResult
    importance: ImportanceResult


def robustness_by_group(model: MultimodalModel, records: Sequence[Record], groups: dict[str, str],
                        batch_size: int = 128, on_error: Literal["raise", "skip"] = "raise") -> list[GroupRobustness]:
    """Missing-modality subsets and modality importance of each group, on its decoded samples."""
    decoded = decode_records(model, records, on_error)
    members: dict[str, list[Any]] = {}
    for sample in decoded.samples:
        members.setdefault(groups.get(sample.id, MISSING_GROUP), []).append(sample)
    results = []
    for name in group_order(list(members)):
        subsets = missing_subsets(model, CachedRunner(model, members[name], batch_size))
        results.append(GroupRobustness(name, len(members[name]), subsets, shapley_importance(subsets)))
    return results


def _file_part(column: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", column).strip("_") or "column"


def write_group_robustness(results: list[GroupRobustness], column: str, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    part = _file_part(column)
    files = {"subsets": out / f"missing_subsets_by_{part}.csv", "importance": out / f"importance_by_{part}.csv"}
    names = list(results[0].subsets.all.metrics) if results else []
    with atomic_file(files["subsets"]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([column, "samples", "present", "n_present", *names])
        for r in results:
            for s in [*r.subsets.subsets, r.subsets.empty]:
                writer.writerow([r.group, r.samples, s.name, len(s.present), *(f"{s.metrics[n]:.4f}" for n in names)])
    with atomic_file(files["importance"]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([column, "samples", "metric", "modality", "ablation_delta", "shapley"])
        for r in results:
            for m in r.importance.modalities:
                writer.writerow([r.group, r.samples, r.importance.metric, m, f"{r.importance.ablation[m]:.4f}",
                                 f"{r.importance.shapley[m]:.4f}"])
    return files


def group_robustness_table(column: str, results: list[GroupRobustness]) -> Table:
    """Per group: the main metric with everything present, without each modality, with none; Shapley values."""
    first = results[0].subsets
    metric, modalities = first.metric, first.modalities
    table = Table(title=f"robustness by {column} ({metric}; Shapley: positive = the modality helps)")
    columns = [column, "samples", "all", *[f"no {m}" for m in modalities], "none",
               *[f"Shapley {m}" for m in modalities]]
    for heading in columns:
        # the group names must stay readable: a narrow terminal squeezes the numbers first
        table.add_column(heading, justify="left" if heading == column else "right", no_wrap=heading == column)
    for r in results:
        everything = set(modalities)
        table.add_row(r.group, str(r.samples), f"{r.subsets.value(everything):.4f}",
                      *[f"{r.subsets.value(everything - {m}):.4f}" for m in modalities],
                      f"{r.subsets.empty.metrics[metric]:.4f}",
                      *[f"{r.importance.shapley[m]:.4f}" for m in modalities])
    return table
