"""ASGI middleware: the body-size cap and per-request metrics, outside any route's code."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmfuse.serve.inputs import BadRequest
from mmfuse.serve.metrics import ServerMetrics

KNOWN_ROUTES = frozenset({"/", "/predict", "/health", "/ready", "/info", "/metrics", "/docs", "/openapi.json"})


class BodyTooLarge(BadRequest):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit:,} bytes")


class BodyLimit:
    """Refuses a body over ``max_bytes``: from its Content-Length before reading it, else while it
    streams in (a chunked upload has none), so the server never holds more than the cap of one request.

    The rest of a refused body is read and thrown away, up to ``DRAIN_FACTOR`` times the cap,
    before the 413 goes out: most HTTP clients are still sending when an early answer arrives and
    report a reset connection instead of the 413. Past that the connection is simply closed.
    """

    DRAIN_FACTOR = 8

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.max_bytes * self.DRAIN_FACTOR:
                await _drain(receive)
            await _send_json(send, 413, {"detail": BodyTooLarge(self.max_bytes).message})
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive, self.max_bytes * self.DRAIN_FACTOR - received)
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Counts every response by route and status and times it (unknown paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        started = time.perf_counter()
        status = 500

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


async def _drain(receive: Receive, budget: float = float("inf")) -> None:
    """Reads and discards the rest of the request body, stopping after ``budget`` bytes."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
