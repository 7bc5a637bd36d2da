"""The last line: an exception no route turned into an answer becomes a plain 500, never a traceback.

Starlette's own handler for ``Exception`` answers and then re-raises, so uvicorn closes the
connection and a keep-alive client's next request fails too. ``Guard`` sits inside the metrics
middleware: it logs the traceback on the server, answers a generic 500 (if nothing was sent yet)
and returns normally, so the connection lives on. Hostile input never gets this far: every limit
and decoding failure is a ``BadRequest`` earlier; a 500 here is the server's own fault.

``public_message`` is applied to every error body: a message built from a library's exception can
carry an object's repr (``<_io.BytesIO object at 0x7f...>``), which tells an attacker heap addresses.
"""

from __future__ import annotations

import json
import logging
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("mmfuse.serve")

INTERNAL_ERROR = "internal server error: the request could not be answered; the server's log has the details"
_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def public_message(text: str) -> str:
    """``text`` on one line without object reprs or addresses."""
    return " ".join(_ADDRESS.sub("0x...", _REPR.sub("", text)).split())


class Guard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if started:
                return  # the status is out already: nothing sensible can follow
            body = json.dumps({"detail": INTERNAL_ERROR}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
