"""The ``mmfuse`` Typer app, its global options and the helpers every command group shares.

User errors (``MMFuseError``) print one red line and exit 1; ``--debug`` shows the traceback. A run
stopped by SIGTERM or Ctrl-C while training prints one line and exits 128 + the signal number.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmfuse.core.errors import MMFuseError
from mmfuse.core.version import __version__
from mmfuse.engine.interrupts import SignalInterrupt

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal fusion over text, images and audio.")
data_app = typer.Typer(no_args_is_help=True, help="Build data sets.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}
THREADS_HELP = ("CPU threads for torch (default: the whole cores other processes leave free, within the CPU "
                "affinity and cgroup quota: mmfuse.core.threads).")
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Turns user errors into one clear line and a non-zero exit instead of a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MMFuseError as exc:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except SignalInterrupt as stop:
            if _state["debug"]:
                raise
            err_console.print(f"[bold yellow]interrupted:[/] {escape(str(stop))}", highlight=False, soft_wrap=True)
            raise typer.Exit(stop.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _quiet_libraries() -> None:
    """Lightning's info lines drown the output a user cares about; warnings stay visible in --debug."""
    if not _state["debug"]:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _version(value: bool) -> None:
    if value:
        console.print(f"mmfuse {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
) -> None:
    _state["debug"] = debug
    _quiet_libraries()


def metrics_table(title: str, metrics: dict[str, float]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    return table


@app.command("list")
def list_components() -> None:
    """List registered encoders, fusion methods, tasks and presets."""
    from mmfuse.config.presets import preset_names
    from mmfuse.core.registry import ENCODERS, FUSIONS, TASKS

    for title, names in (("encoders", ENCODERS.names()), ("fusion", FUSIONS.names()), ("tasks", TASKS.names()),
                         ("presets", preset_names())):
        console.print(f"[bold]{title}:[/] {', '.join(names)}")
