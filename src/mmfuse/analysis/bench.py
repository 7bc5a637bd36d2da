"""``mmfuse bench``: every fusion method (and each modality alone) on the same data, encoders and
budget, over several seeds, with the results a paper table needs.

The data is preprocessed once and shared by every run. Each run records its task metrics on the
test split (validation when there is none), the main metric with modalities hidden at test time
(without each modality, each alone, and the mean over those subsets), its parameter count,
training time and peak memory. ``runs.csv`` is rewritten after every run, so an interrupted
benchmark keeps what it finished.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import resource
import statistics
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from mmfuse.config import ExperimentConfig, FusionConfig
from mmfuse.core.atomic import atomic_file
from mmfuse.core.errors import ConfigError
from mmfuse.data.dataset import MultimodalDataset
from mmfuse.engine.data import PreparedData, prepare_data
from mmfuse.engine.evaluate import evaluate
from mmfuse.engine.fit import fit
from mmfuse.fusion import FUSIONS
from mmfuse.model import MultimodalModel

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

    def row(self) -> dict[str, object]:
        return {
            "method": self.method, "modalities": self.modalities, "modality_dropout": self.modality_dropout,
            "seed": self.seed, **{k: round(v, 6) for k, v in self.metrics.items()},
            **{k: round(v, 6) for k, v in self.missing.items()},
            "params": self.params, "train_seconds": round(self.train_seconds, 2),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
        }


def resolve_methods(spec: str) -> list[str]:
    """'all' or a comma-separated list of registry names, checked against the registry."""
    if spec.strip() == "all":
        return FUSIONS.names()
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods needs 'all' or at least one fusion name")
    for method in methods:
        FUSIONS.get(method)
    return methods


def planned_runs(config: ExperimentConfig, methods: list[str], dropouts: list[float],
                 unimodal: bool) -> list[tuple[str, float, ExperimentConfig]]:
    """(method label, modality dropout, config) per run, before seeds are applied.

    ``model_copy(update=...)`` skips validation on purpose: the data section keeps every modality
    (the prepared data is shared) while a unimodal run's model reads only one of them.
    """
    runs = []
    if unimodal and len(config.modalities) > 1:
        for modality in config.modalities:
            solo = config.model_copy(deep=True, update={
                "encoders": {modality: config.encoders[modality]},
                "fusion": config.fusion.model_copy(update={"name": "concat"}),
            })
            runs.append((f"{modality}{UNIMODAL_SUFFIX}", 0.0, solo))
    for method in methods:
        # The config's fusion options belong to its own method; other methods run with their defaults.
        fusion = (config.fusion if method == config.fusion.name
                  else FusionConfig(name=method, out_dim=config.fusion.out_dim))
        for rate in dropouts:
            trainer = config.trainer.model_copy(update={"modality_dropout": rate})
            runs.append((method, rate, config.model_copy(deep=True, update={"fusion": fusion, "trainer": trainer})))
    return runs


class PeakMemory:
    """Peak memory during a run: CUDA allocator peak on a GPU, else the process's resident set.

    The process's ru_maxrss never decreases, so on the CPU a thread samples /proc/self/statm
    instead (Linux); elsewhere ru_maxrss is the best available answer.
    """

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    @contextmanager
    def track(self) -> Iterator[PeakMemory]:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak_mb = self._rss_mb()
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            sampler.join()
            if cuda:
                self.peak_mb = torch.cuda.max_memory_allocated() / 2**20


def missing_modality_scores(model: MultimodalModel, dataset: MultimodalDataset, metric: str) -> dict[str, float]:
    """The main metric with modalities hidden at test time: without each one, with each one alone
    (three or more modalities), and the mean over every such proper subset (``missing_mean``), the
    one number that says how well a model copes with missing modalities.
    """
    modalities = list(model.modalities)
    if len(modalities) < 2:
        return {}
    scores = {}
    for modality in modalities:
        scores[f"{metric}_without_{modality}"] = evaluate(model, dataset, absent=[modality])[metric]
    if len(modalities) > 2:
        for modality in modalities:
            others = [m for m in modalities if m != modality]
            scores[f"{metric}_only_{modality}"] = evaluate(model, dataset, absent=others)[metric]
    subsets = [set(c) for k in range(1, len(modalities)) for c in itertools.combinations(modalities, k)]
    subset_scores = [evaluate(model, dataset, absent=[m for m in modalities if m not in keep])[metric]
                     for keep in subsets]
    scores[f"{metric}_missing_mean"] = sum(subset_scores) / len(subset_scores)
    return scores


def run_one(label: str, rate: float, config: ExperimentConfig, seed: int, data: PreparedData,
            out_dir: Path) -> BenchRun:
    run_dir = out_dir / "runs" / f"{label.replace(' ', '_')}-d{rate:g}-s{seed}"
    trainer = config.trainer.model_copy(update={"output_dir": run_dir, "progress_bar": False})
    config = config.model_copy(update={"seed": seed, "trainer": trainer})
    with PeakMemory().track() as memory:
        result = fit(config, data, save=False)
    split = "test" if len(data.datasets.get("test", [])) else "val"
    metrics = result.test_metrics if split == "test" and result.test_metrics else result.val_metrics
    main_metric, _ = data.task.monitor
    dataset = data.datasets[split]
    if config.data.cache:  # the frozen encoders' outputs for this split are cached already: all hits
        from mmfuse.engine.feature_cache import cache_datasets

        dataset = cache_datasets(result.model, {split: dataset}, config.data.cache_dir, device="cpu")[0][split]
    missing = missing_modality_scores(result.model, dataset, main_metric)
    return BenchRun(method=label, modalities="+".join(result.model.modalities), seed=seed, modality_dropout=rate,
                    metrics=metrics, missing=missing, params=result.params, train_seconds=result.train_seconds,
                    peak_memory_mb=memory.peak_mb)


def run_bench(config: ExperimentConfig, methods: list[str], seeds: int, out_dir: Path,
              dropouts: list[float] | None = None, unimodal: bool = True,
              on_run: Callable[[BenchRun, int, int], None] | None = None) -> list[BenchRun]:
    """Trains every planned run for ``seeds`` seeds and writes the result files into ``out_dir``."""
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    data = prepare_data(config)
    plan = planned_runs(config, methods, dropouts or [config.trainer.modality_dropout], unimodal)
    total = len(plan) * seeds
    runs: list[BenchRun] = []
    for seed in range(config.seed, config.seed + seeds):
        for label, rate, run_config in plan:
            run = run_one(label, rate, run_config, seed, data, out_dir)
            runs.append(run)
            write_runs(runs, out_dir / "runs.csv")
            if on_run:
                on_run(run, len(runs), total)
    write_summary(runs, out_dir)
    plot_bench(runs, out_dir, data.task.monitor[0])
    return runs


# ---- outputs ------------------------------------------------------------------------------------

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


def write_summary(runs: list[BenchRun], out_dir: Path) -> None:
    summary = summarise(runs)
    keys = list(dict.fromkeys(k for row in summary for k in row.mean))
    with (out_dir / "summary.csv").open("w", newline="") as handle:
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
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


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
    fig.savefig(out_dir / f"bench_{metric}.png", dpi=120)
    plt.close(fig)

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
    fig.savefig(out_dir / f"bench_missing_{metric}.png", dpi=120)
    plt.close(fig)
