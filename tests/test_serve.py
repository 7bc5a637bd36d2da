"""``mmfuse serve``: every endpoint, every class of bad request, batching, explanations, and that a
served prediction equals ``mmfuse predict`` for the same files."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import train_small_model
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.serve.app import create_app
from mmfuse.serve.settings import ServeSettings

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small_model(synth_manifest, tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def rows(synth_manifest: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in synth_manifest.read_text().splitlines()]
    for row in rows:
        row["image"], row["audio"] = (str(synth_manifest.parent / row[m]) for m in ("image", "audio"))
    return rows


def ready_client(model_dir: Path, **settings: Any) -> TestClient:
    client = TestClient(create_app(model_dir, ServeSettings(**settings)))
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    client = ready_client(model_dir, max_wait_ms=20)
    yield client
    client.__exit__(None, None, None)


def multipart(row: dict[str, Any], modalities: tuple[str, ...] = ("text", "image", "audio")) -> dict[str, Any]:
    data = {"text": row["text"]} if "text" in modalities else {}
    files = {m: (Path(row[m]).name, Path(row[m]).read_bytes()) for m in ("image", "audio") if m in modalities}
    return {"data": data, "files": files}


def cli_predict(model_dir: Path, row: dict[str, Any], modalities: tuple[str, ...]) -> dict[str, Any]:
    args = [f"--{m}" if m != "text" else "--text" for m in modalities]
    command = ["predict", "-m", str(model_dir)]
    for flag, m in zip(args, modalities, strict=True):
        command += [flag, row[m]]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def assert_same_prediction(served: dict[str, Any], expected: dict[str, Any]) -> None:
    assert served["label"] == expected["label"]
    assert served["modalities"] == expected["modalities"]
    assert served["probabilities"].keys() == expected["probabilities"].keys()
    for name, p in expected["probabilities"].items():
        assert served["probabilities"][name] == pytest.approx(p, abs=2e-6)


# ---- endpoints ------------------------------------------------------------------------------------


def test_health_ready_info_metrics_and_docs(client: TestClient, model_dir: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["modalities"] == {"audio": "audio", "image": "image", "text": "text"}
    assert info["task"] == "classification" and len(info["labels"]) == 8 and info["backend"] == "pytorch"
    assert info["limits"]["max_image_pixels"] == 40_000_000 and info["batching"]["max_batch_size"] == 16
    assert info["mmfuse_version"] == __import__("mmfuse").__version__
    client.get("/health")
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'mmfuse_requests_total{route="/health",status="200"}' in metrics.text
    assert "mmfuse_model_ready 1.0" in metrics.text
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]["/predict"]["post"]["requestBody"]["content"]) == {"multipart/form-data",
                                                                                  "application/json"}
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "predict-form" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_not_ready_until_loaded(model_dir: Path) -> None:
    """Without start-up (no lifespan) the model never loads: /ready and /predict say 503, /health 200."""
    client = TestClient(create_app(model_dir))
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503 and client.get("/ready").json()["status"] == "loading"
    response = client.post("/predict", json={"text": "hello"})
    assert response.status_code == 503 and "loading" in response.json()["detail"]
    assert client.get("/info").status_code == 503


def test_a_model_that_cannot_load_reports_why(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{broken")
    heard: list[str] = []
    with TestClient(create_app(tmp_path, on_load_error=heard.append)) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "not an mmfuse model folder" in ready.json()["detail"]
        assert client.post("/predict", json={"text": "x"}).status_code == 503
    assert heard and "not an mmfuse model folder" in heard[0]


# ---- predictions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("modalities", [("text", "image", "audio"), ("text", "image"), ("audio",)])
def test_served_prediction_equals_mmfuse_predict(client: TestClient, model_dir: Path, rows: list[dict[str, Any]],
                                                 modalities: tuple[str, ...]) -> None:
    row = rows[3]
    response = client.post("/predict", **multipart(row, modalities))
    assert response.status_code == 200, response.text
    assert_same_prediction(response.json(), cli_predict(model_dir, row, modalities))


def test_json_with_base64_equals_multipart(client: TestClient, rows: list[dict[str, Any]]) -> None:
    row = rows[5]
    body = {"text": row["text"], "image": base64.b64encode(Path(row["image"]).read_bytes()).decode(),
            "audio": "data:audio/wav;base64," + base64.b64encode(Path(row["audio"]).read_bytes()).decode()}
    as_json = client.post("/predict", json=body)
    assert as_json.status_code == 200, as_json.text
    assert_same_prediction(as_json.json(), client.post("/predict", **multipart(row)).json())


def test_empty_form_fields_count_as_not_given(client: TestClient, rows: list[dict[str, Any]]) -> None:
    """A browser form sends every field: an empty text and an unchosen file are absent modalities."""
    row = rows[2]
    response = client.post("/predict", data={"text": ""},
                           files={"image": (Path(row["image"]).name, Path(row["image"]).read_bytes()),
                                  "audio": ("", b"")})
    assert response.status_code == 200, response.text
    assert response.json()["modalities"] == ["image"]


def test_explanations_are_shapley_values_that_add_up(client: TestClient, rows: list[dict[str, Any]]) -> None:
    row = rows[7]
    answer = client.post("/predict?explain=1", **multipart(row)).json()
    plain = client.post("/predict", **multipart(row)).json()
    assert_same_prediction(answer, plain)
    contributions, explained = answer["contributions"], answer["explained"]
    assert set(contributions) == {"audio", "image", "text"}
    assert explained["quantity"] == f"probability of '{answer['label']}'"
    assert explained["with_all"] == pytest.approx(answer["probabilities"][answer["label"]], abs=1e-6)
    assert sum(contributions.values()) == pytest.approx(explained["with_all"] - explained["with_none"], abs=1e-5)
    # Efficiency is not enough: with one modality given its contribution is v({m}) - v({}).
    alone = client.post("/predict?explain=1", **multipart(row, ("text",))).json()
    text_only = client.post("/predict", **multipart(row, ("text",))).json()
    assert set(alone["contributions"]) == {"text"}
    label = alone["label"]
    assert alone["contributions"]["text"] == pytest.approx(
        text_only["probabilities"][label] - alone["explained"]["with_none"], abs=2e-6)
    assert abs(alone["contributions"]["text"]) > 1e-4


def test_concurrent_requests_are_batched_and_answer_the_same(model_dir: Path, rows: list[dict[str, Any]]) -> None:
    client = ready_client(model_dir, max_batch_size=8, max_wait_ms=200)
    try:
        singles = [client.post("/predict", **multipart(row)).json() for row in rows[:8]]
        answers: list[dict[str, Any]] = [{} for _ in range(8)]

        def ask(i: int) -> None:
            answers[i] = client.post("/predict", **multipart(rows[i])).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, expected in zip(answers, singles, strict=True):
            assert_same_prediction(got, expected)
        batch_sizes = _histogram_counts(client.get("/metrics").text, "mmfuse_batch_size")
        assert batch_sizes["1.0"] >= 8, "the sequential requests ran alone"
        assert batch_sizes["+Inf"] < 16, f"the 8 concurrent requests were not batched: {batch_sizes}"
    finally:
        client.__exit__(None, None, None)


def _histogram_counts(text: str, name: str) -> dict[str, float]:
    counts = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            counts[le] = float(line.rsplit(" ", 1)[1])
    return counts


# ---- bad requests ---------------------------------------------------------------------------------


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(seconds: float, rate: int = 16000, nan: bool = False) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    if nan:
        wave[10] = np.nan
    sf.write(buffer, wave, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


@pytest.mark.parametrize(("request_kwargs", "status", "message"), [
    ({"content": b"text=hi", "headers": {"content-type": "text/plain"}}, 415, "content type 'text/plain'"),
    ({"content": b"hi"}, 415, "content type '(none)'"),
    ({"json": {"video": "aGk="}}, 422, "unknown field 'video'"),
    ({"json": {"features": [1.0, 2.0]}}, 422, "not trained with 'features'"),
    ({"data": {"colour": "red"}}, 422, "unknown field 'colour'"),
    ({"json": {}}, 422, "give at least one input"),
    ({"json": ["text"]}, 422, "must be an object"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
    ({"json": {"image": "%%%not base64"}}, 422, "field 'image' is not valid base64"),
    ({"json": {"text": 42}}, 422, "field 'text' must be a string"),
    ({"data": {"image": "a string"}}, 422, "field 'image' must be a file upload"),
    ({"files": {"image": ("photo.png", b"\x89PNG\r\n\x1a\n garbage")}}, 422, "cannot decode image photo.png"),
    ({"files": {"audio": ("clip.wav", b"RIFF1234WAVEfmt nonsense")}}, 422, "cannot decode audio clip.wav"),
    ({"files": {"audio": ("nan.wav", wav_bytes(0.5, nan=True))}}, 422, "nan.wav has non-finite samples"),
    ({"files": {"image": ("big.png", png_bytes(600, 500))}}, 413, "300,000 pixels; the limit is 250,000"),
    ({"files": {"audio": ("long.wav", wav_bytes(3.0))}}, 413, "lasts 3 s; the limit is 2 s"),
    ({"data": {"text": "word " * 300}}, 413, "text of 1,500 characters; the limit is 1,000"),
    ({"content": b"x" * 300_000, "headers": {"content-type": "application/json"}}, 413, "exceeds the limit"),
    ({"files": {"audio": ("a.wav", b"\0" * 300_000)}}, 413, "exceeds the limit"),
])
def test_bad_requests_get_a_clear_4xx(limited: TestClient, request_kwargs: dict[str, Any], status: int,
                                      message: str) -> None:
    response = limited.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.fixture(scope="module")
def limited(model_dir: Path) -> Iterator[TestClient]:
    client = ready_client(model_dir, max_image_pixels=250_000, max_audio_seconds=2.0, max_text_chars=1000,
                          max_body_bytes=200_000)
    yield client
    client.__exit__(None, None, None)


def test_a_chunked_body_over_the_cap_is_refused_while_streaming(limited: TestClient) -> None:
    """No Content-Length (a generator body is sent chunked): the cap applies as the bytes arrive."""
    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b"a" * 10_000

    response = limited.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]


def test_bad_explain_flag_and_timeouts(model_dir: Path, client: TestClient, rows: list[dict[str, Any]]) -> None:
    assert client.post("/predict?explain=maybe", json={"text": "hi"}).status_code == 422
    hurried = ready_client(model_dir, timeout_s=1e-4)
    try:
        response = hurried.post("/predict", **multipart(rows[0]))
        assert response.status_code == 504 and "did not finish within" in response.json()["detail"]
        assert hurried.get("/health").status_code == 200  # the server lives on
    finally:
        hurried.__exit__(None, None, None)


def test_no_bad_request_is_a_server_error(limited: TestClient) -> None:
    metrics = limited.get("/metrics").text
    assert 'status="500"' not in metrics


def test_serve_command_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 1
    assert "not an mmfuse model folder: config.json is missing" in result.output


def test_the_serve_command_answers_and_exits_1_when_the_model_cannot_load(model_dir: Path, tmp_path: Path) -> None:
    """The real command in a subprocess: it serves; a corrupt model folder ends it with one clear line."""
    import subprocess
    import sys

    import httpx
    from serve_helpers import free_port

    port = free_port()
    command = [sys.executable, "-m", "mmfuse.cli", "serve", str(model_dir), "--port", str(port), "--threads", "1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        info = httpx.get(f"http://127.0.0.1:{port}/info").json()
        assert info["modalities"] == {"audio": "audio", "image": "image", "text": "text"}
    finally:
        server.terminate()
        server.wait(timeout=30)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("preprocessing.json", "model.safetensors"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "config.json").write_text("{not json")
    failed = subprocess.run([*command[:4], str(broken), "--port", str(free_port())], capture_output=True, text=True,
                            timeout=120)
    assert failed.returncode == 1
    assert "config.json: not valid JSON" in failed.stderr


def test_onnx_backend_answers_as_pytorch_does(synth_manifest: Path, tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    """``mmfuse serve --onnx``: the same API and the same answers (to 1e-4) through onnxruntime."""
    from mmfuse.export.onnx import export_onnx
    from mmfuse.model import MultimodalModel

    folder = train_small_model(synth_manifest, tmp_path, text_encoder="text_transformer")
    graph = export_onnx(MultimodalModel.from_pretrained(folder), tmp_path / "model.onnx")
    torch_client, onnx_client = ready_client(folder), ready_client(folder, onnx=graph, threads=1)
    try:
        assert onnx_client.get("/info").json()["backend"] == "onnxruntime"
        for row, modalities in ((rows[0], ("text", "image", "audio")), (rows[1], ("image",)),
                                (rows[2], ("text", "audio"))):
            expected = torch_client.post("/predict?explain=1", **multipart(row, modalities)).json()
            got = onnx_client.post("/predict?explain=1", **multipart(row, modalities)).json()
            assert got["label"] == expected["label"] and got["modalities"] == expected["modalities"]
            for name, p in expected["probabilities"].items():
                assert got["probabilities"][name] == pytest.approx(p, abs=1e-4)
            for name, phi in expected["contributions"].items():
                assert got["contributions"][name] == pytest.approx(phi, abs=1e-4)
        assert onnx_client.post("/predict", json={"image": "%%"}).status_code == 422
    finally:
        torch_client.__exit__(None, None, None)
        onnx_client.__exit__(None, None, None)

