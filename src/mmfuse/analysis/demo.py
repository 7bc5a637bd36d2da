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
from mmfuse.config import ExperimentConfig, load_config
from mmfuse.config.presets import preset_path
from mmfuse.core.atomic import atomic_file
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


def run_demo(out_dir: Path, overrides: list[str] | None = None, progress: bool = False) -> list[DemoRow]:
    config = load_config(preset_path("demo"), [f"trainer.output_dir={out_dir}", *(overrides or [])])
    data: PreparedData = prepare_data(config)
    rows = []
    for method, run_config in demo_runs(config):
        run_config.trainer = run_config.trainer.model_copy(update={
            "output_dir": out_dir / "runs" / method.replace(" ", "_"), "progress_bar": progress})
        result = fit(run_config, data, save=True)
        if not result.is_global_zero:  # a DDP rank other than 0: rank 0 reports
            continue
        metrics = result.test_metrics or result.val_metrics
        rows.append(DemoRow(method, "+".join(run_config.modalities), metrics["accuracy"], metrics["macro_f1"],
                            result.params, result.train_seconds))
    if rows:
        write_results(rows, out_dir)
    return rows


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
