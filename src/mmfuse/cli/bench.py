"""``mmfuse demo`` and ``mmfuse bench``: train several fusion methods and compare them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mmfuse.cli.app import app, console, friendly_errors
from mmfuse.core.errors import MMFuseError


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("mmfuse-demo"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override the demo config.")] = None,
    progress: Annotated[bool, typer.Option(help="Show per-run progress bars (with --jobs 1).")] = False,
    jobs: Annotated[int | None, typer.Option(
        min=1, help="Runs trained at once, each in its own process on one thread (default: one per usable core).")]
    = None,
) -> None:
    """Train each modality alone and fused (concat, late) on the embedded data; print a table."""
    from mmfuse.analysis.demo import run_demo

    started = time.perf_counter()
    console.print("[bold]mmfuse demo[/]: synthetic tri-modal data, 8 classes (chance 0.125); "
                  "each modality carries one factor of the label")
    with console.status("training 5 models on the CPU..."):
        rows = run_demo(out, overrides=set_, progress=progress, jobs=jobs)
    if not rows:  # a DDP rank other than 0
        return
    table = Table(title="test set")
    for column in ("method", "modalities", "accuracy", "macro-F1", "params", "train s"):
        table.add_column(column, justify="left" if column in ("method", "modalities") else "right")
    for r in rows:
        table.add_row(r.method, r.modalities, f"{r.accuracy:.3f}", f"{r.macro_f1:.3f}", f"{r.params:,}",
                      f"{r.train_seconds:.1f}")
    console.print(table)
    console.print(f"results: {out / 'results.csv'}, {out / 'results.png'}; models: {out / 'runs'}/<method>/model")
    console.print(f"total {time.perf_counter() - started:.0f} s. Try: mmfuse predict -m {out}/runs/concat/model "
                  "--text 'the sea feels calm this evening' --image IMAGE.png")


def _bench_table(runs: list[Any]) -> Table:
    from mmfuse.analysis.bench_results import summarise

    summary = summarise(runs)
    metric = next(iter(runs[0].metrics))  # the task's main metric: run_bench puts it first
    hidden = sorted({k for row in summary for k in row.mean if k.startswith(f"{metric}_without_")})
    if any(f"{metric}_missing_mean" in row.mean for row in summary):
        hidden.append(f"{metric}_missing_mean")
    table = Table(title=f"test {metric}, mean ± std over seeds")
    names = [h.replace(f"{metric}_without_", "no ").replace(f"{metric}_missing_mean", "missing (mean)") for h in hidden]
    for column in ("method", "dropout", "seeds", metric, *names, "params", "train s", "peak MB"):
        table.add_column(column.replace("_", " "), justify="left" if column == "method" else "right")
    for row in summary:
        table.add_row(row.method, f"{row.modality_dropout:g}", str(row.seeds),
                      f"{row.mean[metric]:.3f} ± {row.std[metric]:.3f}",
                      *[f"{row.mean[h]:.3f}" if h in row.mean else "" for h in hidden],
                      f"{int(row.mean['params']):,}", f"{row.mean['train_seconds']:.1f}",
                      f"{row.mean['peak_memory_mb']:.0f}")
    return table


@app.command()
@friendly_errors
def bench(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML (default: the demo preset).")]
    = None,
    methods: Annotated[str, typer.Option(
        help="'all' (those the task can use) or comma-separated fusion names.")] = "all",
    seeds: Annotated[int, typer.Option(help="Seeds per method (config seed, +1, ...).")] = 3,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("mmfuse-bench"),
    modality_dropout: Annotated[str | None, typer.Option(
        help="Comma-separated rates to compare, e.g. '0,0.3' (default: the config's).")] = None,
    unimodal: Annotated[bool, typer.Option(help="Also train each modality alone.")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override the config.")] = None,
    balance: Annotated[str | None, typer.Option(
        help="Comma-separated trainer.balance settings to compare, e.g. 'none,ogm_ge,agm' (default: the config's).")]
    = None,
    methods_config: Annotated[Path | None, typer.Option(
        "--methods-config", help="YAML of per-method fusion options, e.g. 'lmf: {rank: 8}' (tuned methods are "
        "not compared with defaults); the options of each run go to runs.csv.")] = None,
    jobs: Annotated[int | None, typer.Option(
        min=1, help="Runs trained at once, each in its own process on one thread (default: one per usable core).")]
    = None,
) -> None:
    """Train every fusion method (and each modality alone) on the same data and budget; tabulate."""
    from mmfuse.analysis.bench import resolve_balances, resolve_methods, run_bench
    from mmfuse.config import load_config
    from mmfuse.config.presets import preset_path

    cfg = load_config(config or preset_path("demo"), list(set_ or []))
    names = resolve_methods(methods)
    balances = resolve_balances(balance) if balance else None
    method_options = None
    if methods_config is not None:
        from mmfuse.analysis.bench_methods import load_method_options

        method_options = load_method_options(methods_config)
    try:
        rates = [float(r) for r in modality_dropout.split(",")] if modality_dropout else None
    except ValueError:
        raise MMFuseError(f"--modality-dropout '{modality_dropout}' must be comma-separated numbers") from None
    started = time.perf_counter()

    def report(run: Any, done: int, total: int) -> None:
        metric = next(iter(run.metrics))
        console.print(f"[{done}/{total}] {run.method} (dropout {run.modality_dropout:g}, seed {run.seed}): "
                      f"{metric} {run.metrics[metric]:.3f}, {run.train_seconds:.1f} s", highlight=False)

    def note(text: str) -> None:
        console.print(f"[yellow]note:[/] {text}", highlight=False)

    runs = run_bench(cfg, names, seeds, out, dropouts=rates, unimodal=unimodal, on_run=report,
                     skip_incompatible=methods.strip() == "all", on_note=note, balances=balances,
                     method_options=method_options, jobs=jobs)
    if not runs:  # a DDP rank other than 0
        return
    console.print(_bench_table(runs))
    console.print(f"{time.perf_counter() - started:.0f} s. Results: {out}/runs.csv, summary.csv, summary.md, "
                  f"bench_*.png, config.yaml")
