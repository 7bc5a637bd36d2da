"""``mmfuse data xor-features``: the two-modality set with exactly zero uni-modal signal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmfuse.cli.app import console, data_app, friendly_errors


@data_app.command("xor-features")
@friendly_errors
def data_xor_features(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    n_samples: Annotated[int, typer.Option("--n", help="Number of samples.")] = 2000,
    dim: Annotated[int, typer.Option(help="Values per modality.")] = 16,
    separation: Annotated[float, typer.Option(help="Norm of a factor's direction (noise std is 1).")] = 2.0,
    missing_rate: Annotated[float, typer.Option(help="Chance each modality of a sample is absent.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    encoding: Annotated[str, typer.Option(help="linear (factor along one direction) or parity (the factor is "
                                          "the XOR of two latent bits: not linearly readable).")] = "linear",
) -> None:
    """Write two feature modalities whose label is the XOR of one binary factor in each (each alone: chance)."""
    from mmfuse.datasets.xor_features import generate_xor_features

    manifest = generate_xor_features(out, n_samples=n_samples, dim=dim, separation=separation,
                                     missing_rate=missing_rate, seed=seed, encoding=encoding)
    console.print(f"wrote {n_samples} samples to [bold]{manifest}[/]; train with: mmfuse train "
                  f"configs/xor-features.yaml --set data.manifest={manifest}")
