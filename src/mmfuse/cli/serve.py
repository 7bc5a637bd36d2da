"""``mmfuse serve``: a saved model behind HTTP (needs the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmfuse.cli.app import app, console, err_console, friendly_errors
from mmfuse.core.errors import MMFuseError


@app.command()
@friendly_errors
def serve(
    model: Annotated[Path, typer.Argument(help="Saved model folder (a run's model/).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    onnx: Annotated[Path | None, typer.Option(help="Serve this graph from `mmfuse export` through onnxruntime.")]
    = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Samples per model call; 1 turns batching off.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a request waits for others to batch with.")]
    = 5.0,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body, in MiB (413 past it).")]
    = 20.0,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest image, width x height (413 past it).")]
    = 40_000_000,
    max_audio_seconds: Annotated[float, typer.Option(min=0.001, help="Longest audio clip (413 past it).")] = 60.0,
    max_text_chars: Annotated[int, typer.Option(min=1, help="Longest text (413 past it).")] = 20_000,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a prediction may take (504 past it).")] = 30.0,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for torch, or onnxruntime with --onnx (default: one per core).")]
    = None,
) -> None:
    """Serve predictions over HTTP: POST /predict, a web page at /, docs at /docs."""
    try:
        import uvicorn

        from mmfuse.serve.app import create_app
        from mmfuse.serve.settings import ServeSettings
    except ImportError as exc:
        raise MMFuseError(f"mmfuse serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'mmfuse[serve]'") from None
    from mmfuse.engine.fit import torch_threads
    from mmfuse.model import check_model_folder

    check_model_folder(model)
    if onnx is not None and not onnx.is_file():
        raise MMFuseError(f"--onnx {onnx}: no such file (write one with `mmfuse export {model} --out {onnx}`)")
    settings = ServeSettings(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                             max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
                             max_audio_seconds=max_audio_seconds, max_text_chars=max_text_chars, timeout_s=timeout,
                             onnx=onnx, threads=threads)
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    application = create_app(model, settings, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=5))
    console.print(f"serving {model} on http://{host}:{port} (page /, docs /docs, batch ≤ {max_batch_size})")
    with torch_threads(threads):
        server.run()
    if failure:
        err_console.print(f"[bold red]error:[/] {failure[0]}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
