"""Issue 30, item 3: every hostile or malformed request gets its 4xx (5xx only for the server's own
faults, and then a generic one), work past its deadline never starts, full queues answer 503.

The corpus (``benchmarks/hostile_corpus.py``) starts with the six requests that were 500s; each case
is asserted with its exact status and message. The last test is the acceptance benchmark's fast
form against a real ``mmfuse serve`` on 127.0.0.1 (``benchmarks/serve_hostile.py`` runs the full one).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hostile_helpers import LEAKS, bench, hc, hostile_model
from serve_helpers import running_server

import mmfuse.serve.decode as decode_module
from mmfuse.data.dataset import Sample
from mmfuse.serve import app as app_module
from mmfuse.serve.app import create_app
from mmfuse.serve.batcher import MicroBatcher
from mmfuse.serve.guard import INTERNAL_ERROR
from mmfuse.serve.settings import ServeSettings
from mmfuse.serve.stages import Deadline, DeadlineExceeded, QueueFull

CAP = 2 * 1024 * 1024
CORPUS = hc.corpus()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostile_model(tmp_path_factory)


def ready(application: Any) -> TestClient:
    client = TestClient(application, raise_server_exceptions=False)
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def client(model: Path) -> Iterator[TestClient]:
    client = ready(create_app(model, ServeSettings(max_body_bytes=CAP, threads=1)))
    yield client
    client.__exit__(None, None, None)


def send(client: TestClient | httpx.Client, case: Any) -> httpx.Response:
    request = dict(case.request)
    if "chunks" in request:
        request["content"] = iter(request.pop("chunks"))
    return client.post("/predict", params=case.params, **request)


def assert_answer(case: Any, response: httpx.Response) -> None:
    if case.status is None:
        assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    else:
        assert response.status_code == case.status, response.text
    if case.message:
        assert case.message in response.json()["detail"]
    assert not LEAKS.search(response.text), response.text


def test_the_corpus_starts_with_the_six_former_500s() -> None:
    assert [c.name for c in CORPUS[:6]] == [
        "json nested 1,000 deep", "json integer of 4,301+ digits", "wav claiming 2^31-1 Hz", "features value 1e400",
        "features integer 10^400", ".npy header claiming 1e11 floats"]
    assert len(CORPUS) >= 55 and all(c.status is not None for c in CORPUS[:7])


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_request_gets_its_exact_answer(client: TestClient, case: Any) -> None:
    assert_answer(case, send(client, case))


def test_the_server_saw_no_5xx(client: TestClient) -> None:
    metrics = client.get("/metrics").text
    assert 'route="/predict",status="413"' in metrics
    assert not re.search(r'route="/predict",status="5\d\d"', metrics), metrics


def test_onnx_backend_refuses_the_same_requests(model: Path, tmp_path: Path) -> None:
    """The sixth former 500: nested JSON against ``--onnx``; the whole corpus and 30 fuzzed requests
    get the same answers there."""
    from mmfuse.export.onnx import export_onnx
    from mmfuse.model import MultimodalModel

    graph = export_onnx(MultimodalModel.from_pretrained(model), tmp_path / "model.onnx")
    onnx = ready(create_app(model, ServeSettings(max_body_bytes=CAP, onnx=graph, threads=1)))
    try:
        assert onnx.get("/info").json()["backend"] == "onnxruntime"
        files, _ = bench.sample_files(model)
        for case in CORPUS + hc.fuzz_cases(files, 30, seed=2):
            assert_answer(case, send(onnx, case))
        good = onnx.post("/predict", json={"vec": [0.5] * hc.VEC_WIDTH, "text": "a calm circle"})
        assert good.status_code == 200 and good.json()["modalities"] == ["text", "vec"]
    finally:
        onnx.__exit__(None, None, None)


def test_an_unexpected_error_is_a_generic_500_that_keeps_the_connection(
        model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom in <_io.BytesIO object at 0x7f00deadbeef>")

    monkeypatch.setattr(app_module, "build_request_sample", broken)
    caplog.set_level(logging.ERROR, logger="mmfuse.serve")
    with running_server(create_app(model, ServeSettings(threads=1))) as url, httpx.Client(base_url=url) as http:
        failed = http.post("/predict", json={"text": "hi"})
        assert failed.status_code == 500 and failed.json() == {"detail": INTERNAL_ERROR}
        again = http.get("/health")
        assert again.status_code == 200
        assert bench._port(again) == bench._port(failed), "the 500 dropped the keep-alive connection"
        assert 'status="500"' in http.get("/metrics").text
    logged = [r for r in caplog.records if r.getMessage() == "unexpected error answering POST /predict"]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "boom" in str(logged[0].exc_info[1])


def slow_decoder(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[str]:
    """``decode_field`` made ``seconds`` slower; returns the list of modalities decoded (as they start)."""
    real, started = decode_module.decode_field, []

    def slow(preprocessor: Any, modality: str, field: Any, settings: ServeSettings) -> Any:
        started.append(modality)
        time.sleep(seconds)
        return real(preprocessor, modality, field, settings)

    monkeypatch.setattr(decode_module, "decode_field", slow)
    return started


def concurrently(client: TestClient, n: int, request: dict[str, Any]) -> list[tuple[httpx.Response, float]]:
    answers: list[tuple[httpx.Response, float]] = []

    def ask() -> None:
        began = time.perf_counter()
        response = client.post("/predict", **request)
        answers.append((response, time.perf_counter() - began))

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    return answers


def test_work_past_the_deadline_never_starts(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One decode thread, a 0.4 s deadline, decoding 0.6 s per field: of three two-field requests only
    the first field of the first is ever decoded (before: all six, on six threads, long after the 504s)."""
    started = slow_decoder(monkeypatch, 0.6)
    client = ready(create_app(model, ServeSettings(threads=1, decode_workers=1, timeout_s=0.4)))
    try:
        answers = concurrently(client, 3, {"json": {"text": "a calm circle", "vec": [0.5] * hc.VEC_WIDTH}})
        assert [r.status_code for r, _ in answers] == [504] * 3
        assert all(r.json()["detail"] == "the prediction did not finish within 0.4 s" for r, _ in answers)
        assert max(seconds for _, seconds in answers) < 0.55  # the 504s do not wait for the thread
        time.sleep(0.8)
        assert started == ["text"]
        assert "mmfuse_batch_size_count 0.0" in client.get("/metrics").text  # the model never ran
    finally:
        client.__exit__(None, None, None)


def test_a_full_decode_queue_answers_503_with_retry_after_at_once(model: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    slow_decoder(monkeypatch, 0.5)
    client = ready(create_app(model, ServeSettings(threads=1, decode_workers=1, max_queue=2)))
    try:
        answers = concurrently(client, 6, {"json": {"vec": [0.5] * hc.VEC_WIDTH}})
        statuses = sorted(r.status_code for r, _ in answers)
        assert statuses == [200] * 3 + [503] * 3
        for response, seconds in answers:
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1"
                assert response.json()["detail"] == "the server is busy: 3 requests are in progress; retry in 1 s"
                assert seconds < 0.3
        assert client.get("/info").json()["batching"]["max_queue"] == 2
    finally:
        client.__exit__(None, None, None)


def test_the_model_queue_is_bounded_and_drops_dead_jobs() -> None:
    """A job past its deadline, or whose request gave up, never reaches the model; one past
    ``max_queue`` is refused at once."""
    ran: list[list[str]] = []
    release = threading.Event()

    def run(samples: list[Any]) -> list[dict[str, Any]]:
        release.wait(5)
        ran.append([s.id for s in samples])
        return [{"id": s.id} for s in samples]

    async def scenario() -> None:
        batcher = MicroBatcher(run, max_batch_size=1, max_wait_s=0, max_queue=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([Sample("first", {})]))
        await asyncio.sleep(0.05)  # the first runs (blocked), the queue is empty
        expired = asyncio.ensure_future(batcher.submit([Sample("expired", {})], Deadline(0.01)))
        gone = asyncio.ensure_future(batcher.submit([Sample("gone", {})]))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as full:
            await batcher.submit([Sample("third", {})])
        assert full.value.status == 503 and full.value.headers == {"Retry-After": "1"}
        gone.cancel()
        release.set()
        assert (await first) == [{"id": "first"}]
        with pytest.raises(DeadlineExceeded):
            await expired
        last = await batcher.submit([Sample("last", {})])
        assert last == [{"id": "last"}]
        await batcher.stop()

    asyncio.run(scenario())
    assert ran == [["first"], ["last"]]


def test_a_client_that_disconnects_cancels_its_request(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = slow_decoder(monkeypatch, 0.5)
    with running_server(create_app(model, ServeSettings(threads=1, decode_workers=1))) as url:
        body = {"text": "a calm circle", "vec": [0.5] * hc.VEC_WIDTH}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/predict", json=body, timeout=0.2)
        time.sleep(1.0)
        metrics = httpx.get(url + "/metrics").text
    assert started == ["text"]  # the second field was never decoded
    assert "mmfuse_batch_size_count 0.0" in metrics
    assert 'route="/predict",status="499"' in metrics


def test_fast_battery_and_overload_against_mmfuse_serve(model: Path) -> None:
    """The acceptance benchmark, fast form: >= 100 hostile requests over one keep-alive connection
    (0 5xx, exact answers, no leaks, RSS back within 10%), then 40 clients against a queue of 4."""
    files, good = bench.sample_files(model)
    cases = CORPUS + hc.fuzz_cases(files, 45, seed=1)
    with bench.serving(model, "--threads", "1", "--max-queue", "4") as (url, pid):
        info = httpx.get(url + "/info").json()
        assert info["batching"] == {"max_batch_size": 16, "max_wait_ms": 5.0, "max_queue": 4, "decode_workers": 2}
        assert {k: info["limits"][k] for k in ("max_decode_bytes", "min_sample_rate", "max_sample_rate",
                                               "max_json_depth", "max_json_number_chars", "max_json_values")} == {
            "max_decode_bytes": 256 * 1024 * 1024, "min_sample_rate": 8000, "max_sample_rate": 192_000,
            "max_json_depth": 8, "max_json_number_chars": 64, "max_json_values": 1_000_000}
        battery = bench.run_battery(url, pid, cases, 4, good, 30.0)
        overload = asyncio.run(bench.run_overload(url, good, 40, 2))
    assert battery["failures"] == [] and overload["failures"] == []
    assert battery["requests"] >= 100 and battery["server_errors_5xx"] == 0 and battery["dropped_connections"] == 0
    assert abs(battery["rss_change"]) <= 0.10
    assert overload["statuses"]["503"] > 0 and overload["statuses"]["200"] > 0
    assert set(overload["statuses"]) == {"200", "503"} and overload["retry_after"] == ["1"]
