"""``mmfuse tune``: search hyper-parameters and fusion methods with Optuna (needs ``mmfuse[tune]``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mmfuse.cli.app import app, console, err_console, friendly_errors
from mmfuse.core.errors import MMFuseError
from mmfuse.engine.interrupts import SignalInterrupt, signal_name

SHOWN_TRIALS = 10


def _summary_table(rows: list[dict[str, Any]], monitor: str, direction: str) -> Table:
    """The best finished trials first (pruned ones by their last reported value are not ranked)."""
    from mmfuse.analysis.tune_report import BASE_COLUMNS

    keys = [k for k in (rows[0] if rows else {}) if k not in BASE_COLUMNS]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    done.sort(key=lambda r: r["value"], reverse=direction == "maximize")
    others = [r for r in rows if r["state"] != "COMPLETE"]
    table = Table(title=f"trials by validation {monitor.removeprefix('val_')} ({direction})")
    for column in ("trial", "state", "value", *keys, "s"):
        table.add_column(column, justify="left" if column in ("state", *keys) else "right")
    for row in [*done, *others][:SHOWN_TRIALS]:
        table.add_row(str(row["number"]), row["state"].lower(), "" if row["value"] is None else f"{row['value']:.4f}",
                      *["" if row[k] is None else f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k])
                        for k in keys],
                      "" if row["duration_s"] is None else f"{row['duration_s']:.1f}")
    return table


@app.command()
@friendly_errors
def tune(
    config: Annotated[Path, typer.Option("--config", "-c", help="Base experiment YAML.")],
    space: Annotated[Path, typer.Option("--space", help="Search space YAML: dotted config key -> distribution.")],
    trials: Annotated[int, typer.Option(help="Finished (complete or pruned) trials the study should hold.")] = 20,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: study.db, trials/, best.yaml, "
                                      "trials.csv, plots.")] = Path("mmfuse-tune"),
    storage: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL of the study database (default: sqlite:///OUT/study.db); share one to tune on "
        "several machines.")] = None,
    study_name: Annotated[str, typer.Option(help="Study name inside the storage.")] = "mmfuse",
    jobs: Annotated[int, typer.Option(help="Worker processes running trials in parallel.")] = 1,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    pruner: Annotated[str, typer.Option(help="median (stop a trial whose validation curve is below the median of "
                                        "earlier ones) | none")] = "median",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override the base config.")] = None,
) -> None:
    """Search a space of config values with Optuna; rerun the same command to resume the study.

    Each trial trains in OUT/trials/NNNN; writes OUT/best.yaml (for `mmfuse train -c OUT/best.yaml`),
    OUT/trials.csv, OUT/history.png and OUT/importance.png.
    """
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise MMFuseError("mmfuse tune needs Optuna: pip install 'mmfuse[tune]'") from None
    from mmfuse.analysis.tune import TuneOptions, run_tune
    from mmfuse.analysis.tune_report import trial_rows
    from mmfuse.analysis.tune_space import load_space
    from mmfuse.config import load_config

    base = load_config(config, list(set_ or []))
    search = load_space(space, base)
    options = TuneOptions(trials=trials, out_dir=out, storage=storage, study_name=study_name, jobs=jobs,
                          timeout=timeout, pruner=pruner)
    options.check()
    started = time.perf_counter()

    def report(study: Any, trial: Any) -> None:
        value = "" if trial.value is None else f" {trial.value:.4f}"
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        console.print(f"trial {trial.number}: {trial.state.name.lower()}{value} ({shown})", highlight=False)

    console.print(f"study '{study_name}' in {options.storage_url}: {trials} trials, {jobs} worker(s)", highlight=False)
    try:
        result = run_tune(base, search, options, on_trial=report)
    except SignalInterrupt as stop:
        err_console.print(f"[bold yellow]interrupted:[/] {signal_name(stop.signum)}; the running trial is marked "
                          "failed and queued again with its values, finished trials are kept in "
                          f"{options.storage_url}. Run the same command to continue the study.",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(stop.exit_code) from None
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(_summary_table(trial_rows(result.study), result.monitor, result.direction))
    console.print(f"{result.ran} trial(s) run in {time.perf_counter() - started:.0f} s; files: "
                  + ", ".join(str(p) for p in result.files.values()), highlight=False, soft_wrap=True)
    if "best" in result.files:
        best = result.study.best_trial
        console.print(f"best: trial {best.number}, {result.monitor} {best.value:.4f}. Train it: "
                      f"[bold]mmfuse train -c {result.files['best']}[/]", highlight=False, soft_wrap=True)
