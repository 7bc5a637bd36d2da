"""What ``mmfuse tune`` leaves in its folder: ``best.yaml``, ``trials.csv`` and two plots.

``best.yaml`` is the base config with the best trial's values, its ``trainer.output_dir`` set to a
fresh ``DIR/best-run``: ``mmfuse train -c DIR/best.yaml`` retrains the winner (and saves its model,
which trials do not). Every file is written atomically; a study with no completed trial yet gets
``trials.csv`` only, and a note.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from mmfuse.analysis.bench_results import save_png
from mmfuse.analysis.tune_objective import RUN_DIR_ATTR
from mmfuse.analysis.tune_space import apply_params
from mmfuse.config import ExperimentConfig
from mmfuse.core.atomic import atomic_file, write_text_atomic

BASE_COLUMNS = ("number", "state", "value", "duration_s", "retry_of", "run_dir")


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, duration, the trial it retries, run folder, then one
    column per searched key (empty where a conditional key was not sampled)."""
    trials = study.get_trials(deepcopy=False)
    keys = list(dict.fromkeys(key for t in trials for key in t.params))
    rows = []
    for t in trials:
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append({
            "number": t.number, "state": t.state.name, "value": t.value,
            "duration_s": round(duration, 2) if duration is not None else None,
            "retry_of": t.system_attrs.get("failed_trial"), "run_dir": t.user_attrs.get(RUN_DIR_ATTR),
            **{key: t.params.get(key) for key in keys},
        })
    return rows


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    rows = trial_rows(study)
    columns = list(dict.fromkeys([*BASE_COLUMNS, *(k for row in rows for k in row)]))
    with atomic_file(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if completed else None


def best_config(base: ExperimentConfig, trial: FrozenTrial, out_dir: Path) -> ExperimentConfig:
    config = apply_params(base, trial.params)
    trainer = config.trainer.model_copy(update={"output_dir": out_dir / "best-run"})
    return config.model_copy(update={"trainer": trainer})


def write_best(base: ExperimentConfig, trial: FrozenTrial, out_dir: Path) -> Path:
    """``best.yaml``: a config ``mmfuse train`` reads as is, headed by where it came from."""
    config = best_config(base, trial, out_dir)
    resolved = config.model_dump(mode="json", exclude={"trainer": {"overwrite"}})
    header = (f"# mmfuse tune: best of {out_dir}, trial {trial.number}, value {trial.value:.6g}\n"
              f"# searched values: {json.dumps(trial.params)}\n")
    return write_text_atomic(out_dir / "best.yaml", header + yaml.safe_dump(resolved, sort_keys=False))


def _figure(axes: Axes) -> Figure:
    figure = axes.get_figure(root=True)
    assert isinstance(figure, Figure)
    figure.tight_layout()
    return figure


def write_plots(study: optuna.Study, out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Optimisation history, and parameter importance once two trials have completed (fANOVA needs
    values to compare; with fewer, or when no searched value varied, a note says why it is missing)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    files: dict[str, Path] = {}
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*importances will be equal", category=UserWarning)
        save_png(_figure(optuna_plots.plot_optimization_history(study)), out_dir / "history.png")
        files["history"] = out_dir / "history.png"
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < 2:
            notes.append(f"no importance plot: it needs at least 2 completed trials, the study has {len(completed)}")
            return files, notes
        if len({t.value for t in completed}) == 1:
            notes.append("no importance plot: every completed trial scored the same, nothing to attribute")
            return files, notes
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as exc:
            notes.append(f"no importance plot: {exc}")
            return files, notes
        if not importances or not all(math.isfinite(v) for v in importances.values()):
            notes.append("no importance plot: the completed trials do not vary any searched value")
            return files, notes
        save_png(_figure(optuna_plots.plot_param_importances(study)), out_dir / "importance.png")
        files["importance"] = out_dir / "importance.png"
    return files, notes


def write_outputs(study: optuna.Study, base: ExperimentConfig, out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    files = {"trials": write_trials_csv(study, out_dir / "trials.csv")}
    best = best_trial(study)
    if best is None:
        return files, ["no completed trial yet: no best.yaml and no plots"]
    files["best"] = write_best(base, best, out_dir)
    plots, notes = write_plots(study, out_dir)
    return {**files, **plots}, notes
