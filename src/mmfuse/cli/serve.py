"""``mmfuse serve``: a saved model behind HTTP (needs the ``serve`` extra)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any

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
    max_queue: Annotated[int, typer.Option(min=1, help="Requests that may wait to be decoded, and as many for the "
                                           "model; one more gets 503 with Retry-After.")] = 64,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for torch, or onnxruntime with --onnx (default: the whole cores other "
        "processes leave free, within the CPU affinity and cgroup quota).")]
    = None,
    api_key_file: Annotated[Path | None, typer.Option(
        help="File of API keys, one per line (# comments); with $MMFUSE_API_KEYS (comma-separated), "
             "every route but /health and the page then needs one.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow a non-loopback --host without an API key.")] = False,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate chain (PEM): serve HTTPS.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM), if not in the certificate file.")]
    = None,
    ssl_keyfile_password: Annotated[str | None, typer.Option(
        envvar="MMFUSE_SSL_KEYFILE_PASSWORD", help="Password of an encrypted --ssl-keyfile.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        help="Origin (scheme://host[:port]) whose web pages may call the API; repeatable; none by default.")]
    = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="Host header to answer besides the loopback names (name, address, *.domain or *); repeatable.")]
    = None,
) -> None:
    """Serve predictions over HTTP: POST /predict, a web page at /, docs at /docs."""
    try:
        import uvicorn

        from mmfuse.serve.app import create_app
        from mmfuse.serve.security import (
            SecuritySettings,
            allowed_hosts_for,
            check_tls,
            exposure_problem,
            is_loopback,
            read_api_keys,
        )
        from mmfuse.serve.settings import ServeSettings
    except ImportError as exc:
        raise MMFuseError(f"mmfuse serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'mmfuse[serve]'") from None
    from mmfuse.core.threads import thread_policy
    from mmfuse.model import check_model_folder

    keys, key_note = read_api_keys(api_key_file)
    problem = exposure_problem(host, keys, insecure)
    if problem:
        raise MMFuseError(problem)
    check_tls(ssl_certfile, ssl_keyfile, ssl_keyfile_password)
    security = SecuritySettings(api_keys=keys, allowed_hosts=allowed_hosts_for(host, allowed_host or ()),
                                cors_origins=tuple(cors_origin or ()))
    check_model_folder(model)
    if onnx is not None and not onnx.is_file():
        raise MMFuseError(f"--onnx {onnx}: no such file (write one with `mmfuse export {model} --out {onnx}`)")
    settings = ServeSettings(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                             max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
                             max_audio_seconds=max_audio_seconds, max_text_chars=max_text_chars, timeout_s=timeout,
                             max_queue=max_queue, onnx=onnx, threads=threads, security=security)
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    application = create_app(model, settings, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="info", log_config=log_config(),
                                           timeout_graceful_shutdown=5, ssl_certfile=ssl_certfile,
                                           ssl_keyfile=ssl_keyfile, ssl_keyfile_password=ssl_keyfile_password))
    scheme = "https" if ssl_certfile else "http"
    shown_host = f"[{host}]" if ":" in host else host
    console.print(f"serving {model} on {scheme}://{shown_host}:{port} (page /, docs /docs, batch ≤ {max_batch_size})",
                  highlight=False, soft_wrap=True)
    hosts = ", ".join(f"[{h}]" if ":" in h else h for h in security.allowed_hosts or ())
    console.print(f"{key_note}; Host: {hosts}; CORS: {', '.join(security.cors_origins) or 'off'}", highlight=False,
                  soft_wrap=True)
    if not keys and not is_loopback(host):
        err_console.print(f"[bold yellow]warning:[/] --insecure: anyone who can reach {host} may call this server",
                          highlight=False, soft_wrap=True)
    if keys and not ssl_certfile and not is_loopback(host):
        err_console.print("[bold yellow]warning:[/] the API keys travel in clear text without --ssl-certfile/"
                          "--ssl-keyfile (or a TLS proxy in front)", highlight=False, soft_wrap=True)
    with thread_policy(threads):  # the model thread follows it between batches (serve.batcher)
        server.run()
    if failure:
        err_console.print(f"[bold red]error:[/] {failure[0]}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def log_config() -> dict[str, Any]:
    """uvicorn's logging with the request id in every line (``-`` outside a request): the access lines
    and the errors a request causes can be matched with the ``X-Request-ID`` its client received."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": "mmfuse.serve.middleware.RequestIdFilter"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    config["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(message)s"
    config["formatters"]["access"]["fmt"] = ('%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" '
                                             "%(status_code)s")
    config["loggers"]["mmfuse.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
