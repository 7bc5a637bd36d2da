"""The FastAPI app of ``mmfuse serve``: routes, model loading, error replies.

FastAPI (on uvicorn) was chosen over LitServe because the service is small and asynchronous:
we need our own body parsing (one endpoint, two content types, per-field errors), our own
micro-batcher (jobs of 2^k samples for explanations) and in-process tests; FastAPI gives request
validation and OpenAPI docs for free and adds no worker processes to reason about.

The model loads in the background after start-up: ``/health`` answers at once, ``/ready`` says
503 until the model is loaded, so an orchestrator routes traffic only to a ready server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mmfuse.core.errors import MMFuseError
from mmfuse.core.version import __version__
from mmfuse.serve.batcher import MicroBatcher
from mmfuse.serve.decode import build_request_sample
from mmfuse.serve.inputs import BadRequest, read_fields
from mmfuse.serve.metrics import ServerMetrics
from mmfuse.serve.middleware import BodyLimit, RequestMetrics, install_access_controls
from mmfuse.serve.openapi import PREDICT_OPENAPI
from mmfuse.serve.predictor import Predictor, contributions, explanation_samples
from mmfuse.serve.settings import ServeSettings

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("mmfuse.serve")


@dataclass
class ServerState:
    predictor: Predictor | None = None
    batcher: MicroBatcher | None = None
    error: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)


def create_app(model_dir: Path, settings: ServeSettings | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app serving the model saved in ``model_dir``; ``on_load_error`` hears why loading failed."""
    settings = settings or ServeSettings()
    state = ServerState()

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
                                     state.metrics.observe_batch)
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

    app = FastAPI(title="mmfuse", version=__version__, lifespan=lifespan,
                  description=f"Predictions of the mmfuse model in {model_dir.name} from any subset of its "
                              "modalities.")
    app.state.mmfuse = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    install_access_controls(app, settings.security)  # last: its middleware runs first
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

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
        return {**predictor.info(), "limits": settings.limits(),
                "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms}}

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
        try:
            async with asyncio.timeout(settings.timeout_s):
                return await _predict(request, predictor, state, settings, explain)
        except TimeoutError:
            raise BadRequest(504, f"the prediction did not finish within {settings.timeout_s:g} s") from None

    return app


async def _predict(request: Request, predictor: Predictor, state: ServerState, settings: ServeSettings,
                   explain: bool) -> dict[str, Any]:
    fields = await read_fields(request, predictor.kinds)
    sample = await asyncio.to_thread(build_request_sample, predictor.preprocessor, fields, settings)
    assert state.batcher is not None
    if not explain:
        return (await state.batcher.submit([sample]))[0]
    coalitions = explanation_samples(sample)
    predictions = await state.batcher.submit(coalitions)
    return {**predictions[0], **contributions(sample, predictions)}
