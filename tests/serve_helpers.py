"""Shared by the serving tests: a small trained model and a server that really listens."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from typer.testing import CliRunner

from mmfuse.cli import app


def train_small_model(manifest: Path, folder: Path, fusion: str = "concat", text_encoder: str = "text_gru") -> Path:
    """A quickly trained tri-modal classifier on the synthetic set (a few seconds on one core).

    ``text_encoder: text_transformer`` for a model that exports to ONNX (a GRU cannot)."""
    config = {
        "data": {"manifest": str(manifest), "batch_size": 32, "text": {"max_length": 12},
                 "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}},
        "encoders": {"text": {"name": text_encoder, "dim": 32},
                     "image": {"name": "image_cnn", "dim": 32, "channels": [8, 16]},
                     "audio": {"name": "audio_cnn", "dim": 32, "channels": [8, 16]}},
        "fusion": {"name": fusion},
        "optim": {"lr": 0.005},
        "trainer": {"max_epochs": 3, "patience": None, "progress_bar": False, "threads": 1},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(folder / "config.yaml"), "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder / "run" / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(application: object, timeout_s: float = 60.0,
                   ready_headers: dict[str, str] | None = None) -> Iterator[str]:
    """Runs ``application`` with uvicorn on 127.0.0.1 in a thread until the model is ready; yields its URL.

    ``ready_headers`` go with the readiness polls (an API key, for a server that needs one)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2, headers=ready_headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server at {url} did not become ready within {timeout_s} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
