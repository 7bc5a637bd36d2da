"""How ``mmfuse train`` ends or is launched elsewhere: the one-line report of an interrupted run, and the
ranks of ``--ray-workers`` on a Ray cluster (``mmfuse.engine.ray_launch``)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import NoReturn

import typer

from mmfuse.cli.app import console, err_console
from mmfuse.core.errors import MMFuseError


def train_on_ray(args: list[str], workers: int, address: str | None, gpus: float, placement: str) -> None:
    """``--ray-workers``: the ranks launched on Ray (``mmfuse.engine.ray_launch``); rank 0's report printed."""
    from mmfuse.engine.ray_launch import launch

    if placement not in ("spread", "pack"):
        raise MMFuseError(f"--ray-placement {placement!r}: give spread or pack")
    results = launch(args, workers, address, gpus_per_worker=gpus, placement=placement)
    failed = [r for r in results if r.returncode != 0]
    console.print(results[0].stdout, end="", highlight=False, soft_wrap=True)
    if failed:
        first = failed[0]
        raise MMFuseError(f"rank {first.rank} on {first.node} exited with status {first.returncode}: "
                          f"{first.stderr.strip().splitlines()[-1] if first.stderr.strip() else 'no output'}")
    console.print(f"trained as {workers} DDP ranks on Ray nodes {', '.join(sorted({r.node for r in results}))}")


def report_interrupt(stop: BaseException, output_dir: Path, resume_command: str) -> NoReturn:
    """One line: what stopped the run, whether it can resume and the exact command; exit 128 + signal."""
    from mmfuse.core.distributed import is_rank_zero
    from mmfuse.engine.checkpoint_io import read_checkpoint
    from mmfuse.engine.interrupts import SignalInterrupt, signal_name
    from mmfuse.engine.resume import checkpoint_position, last_checkpoint

    signum = stop.signum if isinstance(stop, SignalInterrupt) else signal.SIGINT
    path = last_checkpoint(output_dir)
    if isinstance(stop, SignalInterrupt) and stop.checkpoint is not None:
        line = (f"{signal_name(signum)}: stopped at global step {stop.step} (epoch {(stop.epoch or 0) + 1}); "
                f"a resumable checkpoint was saved to {stop.checkpoint}; resume with: {resume_command}")
    elif path.is_file():
        try:
            epoch, step = checkpoint_position(read_checkpoint(path))
            at = f" (global step {step}, epoch {epoch + 1})"
        except Exception:  # unreadable: --resume will say why
            at = ""
        line = (f"{signal_name(signum)}: stopped without a new checkpoint; the last resumable checkpoint is "
                f"{path}{at}; resume with: {resume_command}")
    else:
        line = f"{signal_name(signum)}: stopped before any checkpoint was written; nothing to resume"
    if is_rank_zero():  # every DDP rank stops together; one line says so
        err_console.print(f"[bold yellow]interrupted:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(128 + signum)
