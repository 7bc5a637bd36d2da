"""A ``POST /predict`` body -> one raw value per modality, every client mistake a ``BadRequest``.

Two body formats carry the same fields, one per modality the model reads, named after it:
``multipart/form-data`` (``text`` as a field, ``image``/``audio`` as files: what a browser form
sends; a url-encoded form can carry text only) and ``application/json`` (text as a string,
image/audio as base64, features as nested lists). An empty field counts as not given, because a
browser form sends every field, chosen or not. Anything else is refused with the status a client
can act on: 415 for another content type, 413 for JSON past a limit (nesting, number length,
value count: ``mmfuse.serve.jsonlimits``, checked before parsing) or a form part past the body cap,
422 for an unknown field, a modality the model lacks or a value of the wrong type. Names a client
chose are echoed shortened and printable.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from mmfuse.serve.jsonlimits import JsonInvalid, JsonLimits, JsonTooLarge, parse_json
from mmfuse.serve.settings import ServeSettings

FieldValue = str | bytes | list[Any]
"""text -> str; image/audio -> the file's bytes; features -> a (D,) or (T, D) nested list, or .npy bytes."""

MODALITY_KINDS = ("text", "image", "audio", "features")


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status and one line for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Field:
    """One given modality: its value and how the client named it (a file name, for errors)."""

    value: FieldValue
    label: str


async def read_fields(request: Request, kinds: dict[str, str], settings: ServeSettings) -> dict[str, Field]:
    """The request's fields, keyed by modality; ``kinds`` maps each modality the model reads to its kind."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limits = JsonLimits(settings.max_json_depth, settings.max_json_number_chars, settings.max_json_values)
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields = await _multipart_fields(request, kinds, limits, settings.max_body_bytes)
    elif content_type == "application/json":
        fields = await _json_fields(request, kinds, limits)
    else:
        raise BadRequest(415, f"content type '{shown(content_type) or '(none)'}' is not accepted; send "
                              "multipart/form-data (or a url-encoded form) or application/json")
    if not fields:
        raise BadRequest(422, f"give at least one input; this model reads {', '.join(kinds)}")
    return fields


def shown(text: str, limit: int = 40) -> str:
    """A client's string as an error may echo it: at most ``limit`` characters, printable only."""
    clipped = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clipped + ("..." if len(text) > limit else "")


def _check_name(name: str, kinds: dict[str, str]) -> None:
    if name in kinds:
        return
    reads = ", ".join(kinds)
    if name in MODALITY_KINDS:
        raise BadRequest(422, f"this model was not trained with '{name}'; it reads {reads}")
    raise BadRequest(422, f"unknown field '{shown(name)}'; this model reads {reads}")


async def _multipart_fields(request: Request, kinds: dict[str, str], limits: JsonLimits,
                            max_bytes: int) -> dict[str, Field]:
    try:
        # A part may be as large as the body cap: a long text then gets the text limit's clear 413.
        form = await request.form(max_files=len(kinds) + 1, max_fields=len(kinds) + 1, max_part_size=max_bytes)
    except BadRequest:  # the body cap, raised while the body streams in
        raise
    except Exception as exc:  # python-multipart's errors have no common base that starlette exports
        reason = " ".join(str(getattr(exc, "detail", exc)).split()) or type(exc).__name__
        if "maximum size" in reason:
            raise BadRequest(413, f"a form field exceeds the limit of {max_bytes:,} bytes") from None
        if reason.startswith("Too many"):  # more parts than fields: a count limit, like the others 413
            kind = "files" if "files" in reason else "fields"
            raise BadRequest(413, f"the form has more {kind} than the limit of {len(kinds) + 1}; this model "
                                  f"reads {', '.join(kinds)}") from None
        raise BadRequest(422, f"malformed multipart body: {shown(reason, 200)}") from None
    try:
        fields: dict[str, Field] = {}
        for name, value in form.multi_items():
            _check_name(name, kinds)
            if name in fields:
                raise BadRequest(422, f"field '{name}' is given twice")
            if isinstance(value, UploadFile):
                data = await value.read()
                if not data and not value.filename:
                    continue  # a form's file input left empty
                label = shown(value.filename or name)
                fields[name] = Field(_file_value(name, kinds[name], data, label), label)
            elif value.strip():
                fields[name] = Field(_form_text_value(name, kinds[name], value, limits), name)
        return fields
    finally:
        await form.close()


def _file_value(name: str, kind: str, data: bytes, filename: str) -> FieldValue:
    if kind == "text":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(422, f"field '{name}': file {filename} is not UTF-8 text") from None
    return data


def _form_text_value(name: str, kind: str, value: str, limits: JsonLimits) -> FieldValue:
    if kind == "text":
        return value
    if kind == "features":
        return _features_list(name, _parse_json(value.encode("utf-8", errors="replace"), limits, f"field '{name}'"))
    raise BadRequest(422, f"field '{name}' must be a file upload ({kind}), not a text value")


def _parse_json(data: bytes, limits: JsonLimits, where: str) -> Any:
    """``data`` parsed within ``limits``: 413 past one (the message names the field), 422 if not JSON."""
    try:
        return parse_json(data, limits, where)
    except JsonTooLarge as exc:
        message = str(exc)
        if where != "the body" and message.startswith(("the JSON body", "a JSON number")):
            message = f"{where}: {message.removeprefix('the JSON body: ')}"
        raise BadRequest(413, message) from None
    except JsonInvalid as exc:
        raise BadRequest(422, str(exc)) from None


async def _json_fields(request: Request, kinds: dict[str, str], limits: JsonLimits) -> dict[str, Field]:
    payload = _parse_json(await request.body(), limits, "the body")
    if not isinstance(payload, dict):
        raise BadRequest(422, f"the JSON body must be an object of fields, not {type(payload).__name__}")
    fields: dict[str, Field] = {}
    for name, value in payload.items():
        _check_name(name, kinds)
        if value is None or value == "":
            continue
        kind = kinds[name]
        if kind == "text":
            if not isinstance(value, str):
                raise BadRequest(422, f"field '{name}' must be a string, not {type(value).__name__}")
            if value.strip():
                fields[name] = Field(value, name)
        elif kind == "features":
            fields[name] = Field(_features_list(name, value), name)
        else:
            fields[name] = Field(_base64(name, kind, value), name)
    return fields


def _base64(name: str, kind: str, value: Any) -> bytes:
    """Base64 (a ``data:...;base64,`` URL prefix is allowed), strictly: stray characters are an error."""
    if not isinstance(value, str):
        raise BadRequest(422, f"field '{name}' must be a base64 string of the {kind} file, not {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(422, f"field '{name}' is not valid base64") from None


def _features_list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise BadRequest(422, f"field '{name}' must be a non-empty (D,) or (T, D) list of numbers")
    return value
