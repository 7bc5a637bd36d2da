"""ASGI middleware, outside any route's code: request ids, the Host check, CORS, API keys, the body-size
cap and per-request metrics.

``create_app`` puts them in this order, outermost first: ``RequestId`` (so every answer, a refusal
included, carries an ``X-Request-ID`` and its log lines the same id), ``RequestMetrics`` (refusals are
counted too), then what ``install_access_controls`` adds: ``HostCheck`` (a rebound name is refused
before anything else), CORS (a preflight needs no key, and a refused call still tells the browser
why), ``ApiKeyAuth``; then ``BodyLimit`` and the routes.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmfuse.serve.inputs import BadRequest
from mmfuse.serve.metrics import ServerMetrics
from mmfuse.serve.security import LOOPBACK_NAMES, KeyRing, SecuritySettings, host_allowed, is_public

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("mmfuse_request_id", default="-")
"""The id of the request being answered: set by ``RequestId``, read by ``RequestIdFilter``. uvicorn runs
each request in its own task and logs its access and error lines inside it, so they see the id too."""
log = logging.getLogger("mmfuse.serve")

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


async def _drain(receive: Receive, budget: float = float("inf")) -> bool:
    """Reads and discards the rest of the request body, stopping after ``budget`` bytes; whether it ended."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return message["type"] == "http.request"
        budget -= len(message.get("body", b""))
    return False


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None, close: bool = True) -> None:
    """One JSON answer; ``close`` ends the connection (a request body was left unread)."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *([(b"connection", b"close")] if close else []), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (``-`` outside a request) to every record, for a ``%(request_id)s`` format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class RequestId:
    """Gives each request an id and every response an ``X-Request-ID`` header.

    A client's own id is kept when it is sane (1-128 of ``[A-Za-z0-9._-]``), so a caller can follow
    its request through the logs; anything else (too long, spaces, control characters that could
    forge log lines) is replaced by a fresh UUID. A route that raises still answers: a 500 with the
    id is sent before the exception goes on to be logged, with the id, by the server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        request_id.set(rid)
        started = False

        async def tagged(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        except Exception:
            if not started:
                await _send_json(tagged, 500, {"detail": f"internal server error (request id {rid}; the server's "
                                                         "log has the details)"})
            raise


class HostCheck:
    """Answers 400 to a request whose Host header is not allowed (see ``mmfuse.serve.security``)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = allowed
        shown = ", ".join(f"[{h}]" if ":" in h else h for h in allowed)
        self.hint = (f"this server answers to {shown}" + (" (add names with --allowed-host)"
                                                          if set(LOOPBACK_NAMES) <= set(allowed) else ""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(b"host")
        header = raw.decode("latin-1") if raw is not None else None
        if host_allowed(header, self.allowed):
            await self.app(scope, receive, send)
            return
        shown = "no Host header" if header is None else f"Host {header[:100]!a}"
        log.warning("refused a request with %s", shown)
        read = await _drain(receive, UNAUTHORISED_DRAIN)
        await _send_json(send, 400, {"detail": f"{shown} is not allowed; {self.hint}"}, close=not read)


UNAUTHORISED_DRAIN = 1024 * 1024
"""Bytes of a refused request's body read and dropped so its client sees the answer, not a reset; a
connection whose body was read to its end stays open for the client's next request."""


class ApiKeyAuth:
    """Requires one of ``keys`` on every path but the public ones (``security.is_public``).

    The key is read from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A refusal is a 401
    with ``WWW-Authenticate: Bearer`` (RFC 6750; ``error="invalid_token"`` for a wrong key) and one
    JSON line; neither it nor the log shows the key that was sent.
    """

    MISSING = "this server needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    WRONG = "the API key is not valid"

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        candidates = []
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                candidates.append(value.decode("latin-1").strip())
            elif name == b"authorization":
                scheme, _, token = value.decode("latin-1").strip().partition(" ")
                if scheme.lower() == "bearer":
                    candidates.append(token.strip())
        candidates = [c for c in candidates if c]
        if any([self.keys.matches(c) for c in candidates]):  # a list: every candidate is checked
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client[0],
                    "wrong API key" if candidates else "no API key")
        challenge = b'Bearer error="invalid_token"' if candidates else b"Bearer"
        read = await _drain(receive, UNAUTHORISED_DRAIN)
        await _send_json(send, 401, {"detail": self.WRONG if candidates else self.MISSING},
                         [(b"www-authenticate", challenge)], close=not read)


SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}


def _declare_keys(app: FastAPI) -> None:
    """States the key in the OpenAPI description, so a generated client (or a fuzzer) knows to send it:
    both header schemes, required on each operation but the public ones (``security: []`` there)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                operation["security"] = [] if is_public(path) else [{"bearer": []}, {"apiKey": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_access_controls(app: FastAPI, settings: SecuritySettings) -> None:
    """Adds the Host check, CORS and the API keys to ``app``, the Host check outermost (Starlette runs the
    middleware added last first); ``RequestId`` and ``RequestMetrics`` go on after, outside them."""
    if settings.api_keys:
        app.add_middleware(ApiKeyAuth, keys=settings.api_keys)
        _declare_keys(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], expose_headers=[REQUEST_ID_HEADER],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", REQUEST_ID_HEADER])
    if settings.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
