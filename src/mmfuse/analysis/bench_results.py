"""What ``mmfuse bench`` records per run, and the files made from the runs: ``runs.csv``,
``summary.csv``, ``summary.md`` and the bar charts.

Every file is written through ``mmfuse.core.atomic``: an interrupted benchmark leaves the previous
complete file or the new one, never a truncated table.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmfuse.core.atomic import atomic_file, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

UNIMODAL_SUFFIX = " only"


@dataclass
class BenchRun:
    method: str
    modalities: str
    seed: int
    modality_dropout: float
    metrics: dict[str, float]
    missing: dict[str, float] = field(default_factory=dict)
    params: int = 0
    train_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    balance: str = "none"
    """``trainer.balance`` of the run (a remedy other than 'none' is also in ``method``: concat+ogm_ge)."""
    fusion_options: dict[str, Any] = field(default_factory=dict)
    """The options the run's fusion was built with (``out_dim`` included); ``runs.csv`` shows them as JSON."""

    def row(self) -> dict[str, object]:
        return {
            "method": self.method, "modalities": self.modalities, "modality_dropout": self.modality_dropout,
            "seed": self.seed, **{k: round(v, 6) for k, v in self.metrics.items()},
            **{k: round(v, 6) for k, v in self.missing.items()},
            "params": self.params, "train_seconds": round(self.train_seconds, 2),
            "peak_memory_mb": round(self.peak_memory_mb, 1), "balance": self.balance,
            "fusion_options": json.dumps(self.fusion_options, sort_keys=True),
        }


def write_runs(runs: list[BenchRun], path: Path) -> None:
    rows = [r.row() for r in runs]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_file(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class SummaryRow:
    method: str
    modalities: str
    modality_dropout: float
    seeds: int
    mean: dict[str, float]
    std: dict[str, float]


def summarise(runs: list[BenchRun]) -> list[SummaryRow]:
    """Mean and sample std over seeds for every numeric column, per (method, modality dropout)."""
    groups: dict[tuple[str, float], list[BenchRun]] = {}
    for run in runs:
        groups.setdefault((run.method, run.modality_dropout), []).append(run)
    summary = []
    for (method, rate), group in groups.items():
        numeric: dict[str, list[float]] = {}
        for run in group:
            for key, value in run.row().items():
                if key not in ("method", "modalities", "modality_dropout", "seed") and isinstance(value, int | float):
                    numeric.setdefault(key, []).append(float(value))
        summary.append(SummaryRow(
            method=method, modalities=group[0].modalities, modality_dropout=rate, seeds=len(group),
            mean={k: statistics.fmean(v) for k, v in numeric.items()},
            std={k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in numeric.items()},
        ))
    return summary


def write_summary(runs: list[BenchRun], out_dir: Path, notes: list[str] | None = None) -> None:
    """``summary.csv`` (every statistic) and ``summary.md`` (a table to paste, then the notes)."""
    summary = summarise(runs)
    keys = list(dict.fromkeys(k for row in summary for k in row.mean))
    with atomic_file(out_dir / "summary.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "modalities", "modality_dropout", "seeds",
                         *[f"{k}_{stat}" for k in keys for stat in ("mean", "std")]])
        for row in summary:
            writer.writerow([row.method, row.modalities, row.modality_dropout, row.seeds,
                             *[_fmt(stat.get(k)) for k in keys for stat in (row.mean, row.std)]])
    shown = [k for k in keys if k not in ("params", "loss")]
    lines = ["| method | modalities | modality dropout | seeds | params | "
             + " | ".join(shown) + " |", "|" + "---|" * (5 + len(shown))]
    for row in summary:
        cells = [f"{row.mean[k]:.3f} ± {row.std[k]:.3f}" if k in row.mean else "" for k in shown]
        lines.append(f"| {row.method} | {row.modalities} | {row.modality_dropout:g} | {row.seeds} | "
                     f"{int(row.mean.get('params', 0)):,} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    write_text_atomic(out_dir / "summary.md", "\n".join(lines) + "\n")


def _fmt(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6g}"


def plot_bench(runs: list[BenchRun], out_dir: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(runs)
    labels = [r.method if r.modality_dropout == 0 else f"{r.method}\n(drop {r.modality_dropout:g})" for r in summary]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(summary)), 4))
    colours = ["#9aa5b1" if r.method.endswith(UNIMODAL_SUFFIX) else "#2b6cb0" for r in summary]
    ax.bar(labels, [r.mean[metric] for r in summary], yerr=[r.std[metric] for r in summary], color=colours, capsize=3)
    ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.set_title("mmfuse bench")
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    save_png(fig, out_dir / f"bench_{metric}.png")

    fused = [r for r in summary if any(k.startswith(f"{metric}_without_") for k in r.mean)]
    if not fused:
        return
    hidden = sorted({k for r in fused for k in r.mean if k.startswith(f"{metric}_without_")})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(fused)), 4))
    width = 0.8 / (len(hidden) + 1)
    series = [(metric, "all present"), *[(k, k.removeprefix(f"{metric}_")) for k in hidden]]
    for i, (key, name) in enumerate(series):
        xs = [j + i * width for j in range(len(fused))]
        ax.bar(xs, [r.mean.get(key, float("nan")) for r in fused], width=width, label=name.replace("_", " "))
    ax.set_xticks([j + width * len(hidden) / 2 for j in range(len(fused))])
    ax.set_xticklabels([lbl for r, lbl in zip(summary, labels, strict=True) if r in fused], rotation=45, ha="right")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("missing a modality at test time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out_dir / f"bench_missing_{metric}.png")


def save_png(fig: Figure, path: Path) -> None:
    """Saves and closes ``fig`` as a PNG through ``atomic_file``."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")  # the temporary name has no .png to infer it from
    plt.close(fig)
