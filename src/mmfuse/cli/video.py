"""``mmfuse data synth-video``: write the embedded synthetic video set (MP4 files + JSONL manifest)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mmfuse.cli.app import console, data_app, friendly_errors


@data_app.command("synth-video")
@friendly_errors
def data_synth_video(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (new or empty).")],
    n_samples: Annotated[int, typer.Option("--n", help="Number of videos.")] = 400,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write the synthetic video set: a moving shape (left/right) with a low/high tone and a calm/stormy caption.

    Each of the three carries one binary factor of the 8-class label; train on it with
    configs/video-synth.yaml (--set data.manifest=<out>/manifest.jsonl).
    """
    from mmfuse.datasets.synth_video import generate_synthetic_video

    started = time.perf_counter()
    manifest = generate_synthetic_video(out, n_samples=n_samples, seed=seed)
    console.print(f"wrote {n_samples} videos to [bold]{manifest}[/] in {time.perf_counter() - started:.1f} s; "
                  f"train with: mmfuse train -c configs/video-synth.yaml --set data.manifest={manifest}")
