"""The FastAPI app of ``mmfuse serve``: routes, model loading, error replies.

FastAPI (on uvicorn) was chosen over LitServe because the service is small and asynchronous:
we need our own body parsing (one endpoint, two content types, per-field errors), our own
micro-batcher (jobs of 2^k samples for explanations) and in-process tests; FastAPI gives request
validation and OpenAPI docs for free and adds no worker processes to reason about.

The model loads in the background after start-up: ``/health`` answers at once, ``/ready`` says
503 until the model is loaded, so an orchestrator routes traffic only to a ready server.

A prediction has one deadline from its arrival: decoding (a few threads, ``stages.DecodeStage``)
and the model's queue start nothing past it, a client that disconnects cancels its request, and
both queues are bounded (503 with Retry-After past ``max_queue``). Every refusal is a ``BadRequest``
answered as ``{"detail": one line}``; anything else is the server's fault (``guard.Guard``: 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mmfuse.core.errors import MMFuseError
from mmfuse.core.version import __version__
from mmfuse.serve.batcher import MicroBatcher
from mmfuse.serve.decode import build_request_sample
from mmfuse.serve.guard import Guard, public_message
from mmfuse.serve.inputs import BadRequest, read_fields, shown
from mmfuse.serve.metrics import ServerMetrics
from mmfuse.serve.middleware import BodyLimit, RequestId, RequestMetrics, install_access_controls
from mmfuse.serve.openapi import PREDICT_OPENAPI
from mmfuse.serve.predictor import Predictor, contributions, explanation_samples
from mmfuse.serve.settings import ServeSettings
from mmfuse.serve.stages import Admission, Deadline, DeadlineExceeded, DecodeStage

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("mmfuse.serve")


@dataclass
class ServerState:
    predictor: Predictor | None = None
    batcher: MicroBatcher | None = None
    decoder: DecodeStage | None = None
    error: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)


def create_app(model_dir: Path, settings: ServeSettings | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app serving the model saved in ``model_dir``; ``on_load_error`` hears why loading failed."""
    settings = settings or ServeSettings()
    state = ServerState()
    admission = Admission(settings.max_queue + settings.decode_workers)

    async def load() -> None:
        try:
            predictor = await asyncio.to_thread(Predictor.load, model_dir, settings.onnx, settings.threads)
        except MMFuseError as exc:
            state.error = str(exc)
            log.error("cannot load the model: %s", exc)
            if on_load_error is not None:
                on_load_error(str(exc))
            return
        state.batcher = MicroBatcher(predictor.predict, settings.max_batch_size, settings.max_wait_ms / 1000,
                                     state.metrics.observe_batch, settings.max_queue)
        state.decoder = DecodeStage(settings.decode_workers, settings.max_queue)
        state.batcher.start()
        state.predictor = predictor
        state.metrics.ready.set(1)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            if state.batcher is not None:
                await state.batcher.stop()
            if state.decoder is not None:
                await asyncio.to_thread(state.decoder.close)

    app = FastAPI(title="mmfuse", version=__version__, lifespan=lifespan,
                  description=f"Predictions of the mmfuse model in {model_dir.name} from any subset of its "
                              "modalities.")
    app.state.mmfuse = state
    app.add_middleware(Guard)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_access_controls(app, settings.security)  # keys, CORS, Host: inside the metrics, so refusals count
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    app.add_middleware(RequestId)  # added last, so it runs first: every answer carries its id
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": public_message(exc.message)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        """One line like every other refusal (FastAPI's list echoes the input back)."""
        problems = [f"{_location(error.get('loc', ()))}: {error.get('msg', 'invalid')}" for error in exc.errors()]
        return JSONResponse({"detail": public_message("; ".join(problems) or "invalid request")}, status_code=422)

    def ready_predictor() -> Predictor:
        if state.predictor is None:
            raise BadRequest(503, f"the model failed to load: {state.error}" if state.error
                             else "the model is still loading; try again when /ready says 200")
        return state.predictor

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded, 503 before")
    async def ready() -> JSONResponse:
        if state.predictor is not None:
            return JSONResponse({"status": "ready"})
        body = {"status": "failed", "detail": state.error} if state.error else {"status": "loading"}
        return JSONResponse(body, status_code=503)

    @app.get("/info", summary="The model's modalities, labels, version and the input limits")
    async def info() -> dict[str, Any]:
        predictor = ready_predictor()
        return {**predictor.info(), "limits": settings.limits(), "batching": settings.batching()}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict", summary="Predict from any subset of the model's modalities", openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request,
                      explain: bool = Query(False, description="add each present modality's Shapley contribution"),
                      ) -> dict[str, Any]:
        predictor = ready_predictor()
        if explain and not predictor.explainable:
            raise BadRequest(422, "explain needs a classification or regression model, not "
                                  f"'{predictor.info()['task']}'")
        deadline = Deadline(settings.timeout_s)
        try:
            admission.enter()
        except BadRequest:
            await request.body()  # read, not parsed: the connection stays usable for the next request
            raise
        try:
            async with asyncio.timeout(settings.timeout_s):
                fields = await read_fields(request, predictor.kinds, settings)
                return await _until_disconnected(request, _predict(fields, predictor, state, settings, explain,
                                                                   deadline))
        except (TimeoutError, DeadlineExceeded):
            raise BadRequest(504, f"the prediction did not finish within {settings.timeout_s:g} s") from None
        finally:
            admission.leave()

    return app


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    """('query', 'explain') -> "query parameter 'explain'"."""
    parts = [str(part) for part in loc]
    if len(parts) >= 2 and parts[0] in ("query", "path", "header", "cookie"):
        return f"{parts[0]} parameter '{shown(' '.join(parts[1:]))}'"
    return shown(" ".join(parts)) or "the request"


async def _predict(fields: dict[str, Any], predictor: Predictor, state: ServerState, settings: ServeSettings,
                   explain: bool, deadline: Deadline) -> dict[str, Any]:
    assert state.batcher is not None and state.decoder is not None
    sample = await state.decoder.run(deadline, build_request_sample, predictor.preprocessor, fields, settings,
                                     "request", deadline)
    if not explain:
        return (await state.batcher.submit([sample], deadline))[0]
    coalitions = explanation_samples(sample)
    predictions = await state.batcher.submit(coalitions, deadline)
    return {**predictions[0], **contributions(sample, predictions)}


async def _until_disconnected(request: Request, work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """``work``'s result, or its cancellation when the client goes away first (its body is read, so the
    next message the server can send is ``http.disconnect``): nobody would read the answer."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise BadRequest(499, "the client disconnected before the answer")
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
