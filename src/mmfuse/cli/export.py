"""``mmfuse export``: a saved model as a graph for runtimes without mmfuse (ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmfuse.cli.app import app, console, friendly_errors
from mmfuse.core.errors import MMFuseError

FORMATS = ("onnx",)


@app.command("export")
@friendly_errors
def export_model(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="Saved model folder.", show_default=False)],
    format_: Annotated[str, typer.Option("--format", "-f", help="Graph format: onnx.")] = "onnx",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Graph file to write (default: MODEL_DIR/model.onnx); its sidecar is OUT.json.")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset version (default: the exporter's).")] = None,
) -> None:
    """Export a saved model to one ONNX graph that serves any subset of its modalities.

    The graph reads the preprocessed tensors of every modality and a presence mask; OUT.json says
    what to feed it. A self-check then compares the graph with the PyTorch model on a dummy batch.
    """
    if format_.lower() not in FORMATS:
        raise MMFuseError(f"--format {format_}: unknown export format; choose from {', '.join(FORMATS)}")
    from mmfuse.export.onnx import TOLERANCE, export_onnx, self_check
    from mmfuse.export.sidecar import sidecar_path
    from mmfuse.model import MultimodalModel

    model = MultimodalModel.from_pretrained(model_dir)
    path = export_onnx(model, out if out is not None else model_dir / "model.onnx", opset=opset)
    console.print(f"graph written to [bold]{path}[/]")
    console.print(f"sidecar (inputs, preprocessing, labels) written to [bold]{sidecar_path(path)}[/]")
    check = self_check(model, path)
    console.print(f"self-check: max abs difference ONNX vs PyTorch on a dummy batch = {check.difference:.3g} "
                  f"(outputs up to {check.scale:.3g}; limit {TOLERANCE:g} x max(1, that))")
    if not check.ok:  # NaN fails too
        raise MMFuseError(f"the graph does not reproduce the model (max abs difference {check.difference:.3g} is "
                          f"{check.error:.3g} of the outputs' scale, above {TOLERANCE:g}); please report this with "
                          "the model's config.json")
