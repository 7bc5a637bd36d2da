"""``mmfuse demo``: each modality alone vs. fused, on the embedded synthetic data, in minutes on a CPU.

The data is preprocessed once and shared by every run, so the demo measures models, not file
decoding. Results go to ``results.csv`` and ``results.png`` in the output folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from mmfuse.analysis.bench import planned_runs
from mmfuse.analysis.bench_results import UNIMODAL_SUFFIX, save_png
from mmfuse.analysis.run_pool import one_thread_runs, pool_jobs, run_pool
from mmfuse.config import ExperimentConfig, load_config
from mmfuse.config.presets import preset_path
from mmfuse.core.atomic import atomic_file
from mmfuse.core.threads import thread_policy
from mmfuse.engine.data import PreparedData, prepare_data
from mmfuse.engine.fit import fit


@dataclass
class DemoRow:
    method: str
    modalities: str
    accuracy: float
    macro_f1: float
    params: int
    train_seconds: float


def demo_runs(config: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """(method name, config) per run: every single modality alone, then concat and late fusion."""
    plan = planned_runs(config, ["concat", "late"], [config.trainer.modality_dropout], unimodal=True)
    return [(label, run_config) for label, _, run_config in plan]


def run_demo(out_dir: Path, overrides: list[str] | None = None, progress: bool = False,
             jobs: int | None = None) -> list[DemoRow]:
    """Trains the demo's runs, ``jobs`` at a time (default: one process per usable core, one thread
    each: ``mmfuse.analysis.run_pool``), and writes the result files."""
    config = one_thread_runs(load_config(preset_path("demo"), [f"trainer.output_dir={out_dir}", *(overrides or [])]))
    runs = demo_runs(config)
    workers = pool_jobs(config, len(runs), jobs)
    with thread_policy(config.trainer.threads if workers > 1 else None):  # one thread before the fork
        data: PreparedData = prepare_data(config)
    tasks = [(method, _run_config(run_config, out_dir, method, progress and workers == 1))
             for method, run_config in runs]
    done = dict(run_pool(data, tasks, _train_one, workers, names=[m for m, _ in runs]))
    rows = [row for _, row in sorted(done.items()) if row is not None]
    if rows:
        write_results(rows, out_dir)
    return rows


def _run_config(config: ExperimentConfig, out_dir: Path, method: str, progress: bool) -> ExperimentConfig:
    trainer = config.trainer.model_copy(update={"output_dir": out_dir / "runs" / method.replace(" ", "_"),
                                                "progress_bar": progress})
    return config.model_copy(update={"trainer": trainer})


def _train_one(data: PreparedData, task: tuple[str, ExperimentConfig]) -> DemoRow | None:
    """One demo run; None in the other ranks of a DDP run (rank 0 reports)."""
    method, run_config = task
    result = fit(run_config, data, save=True)
    if not result.is_global_zero:
        return None
    metrics = result.test_metrics or result.val_metrics
    return DemoRow(method, "+".join(run_config.modalities), metrics["accuracy"], metrics["macro_f1"], result.params,
                   result.train_seconds)


def write_results(rows: list[DemoRow], out_dir: Path) -> None:
    """``results.csv`` and ``results.png``, each written whole or not at all."""
    with atomic_file(out_dir / "results.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "modalities", "accuracy", "macro_f1", "params", "train_seconds"])
        for r in rows:
            writer.writerow([r.method, r.modalities, f"{r.accuracy:.4f}", f"{r.macro_f1:.4f}", r.params,
                             f"{r.train_seconds:.1f}"])
    plot_results(rows, out_dir / "results.png")


def plot_results(rows: list[DemoRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    colours = ["#9aa5b1" if r.method.endswith(UNIMODAL_SUFFIX) else "#2b6cb0" for r in rows]
    bars = ax.bar([r.method for r in rows], [r.accuracy for r in rows], color=colours)
    ax.bar_label(bars, labels=[f"{r.accuracy:.2f}" for r in rows], padding=2)
    ax.axhline(1 / 8, linestyle="--", color="grey", linewidth=1, label="chance (1/8)")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy")
    ax.set_title("mmfuse demo: single modalities vs. fusion (synthetic tri-modal data)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_png(fig, path)
