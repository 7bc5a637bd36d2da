"""The OpenAPI description of ``POST /predict``, whose body the route parses itself (two formats)."""

from __future__ import annotations

from typing import Any

_FIELDS_DOC = ("One field per modality the model reads, named after it (GET /info lists them); give any "
               "subset. Text as a string; image and audio as files (multipart) or base64 strings (JSON); "
               "features as a (D,) or (T, D) list of numbers (JSON, or a JSON text field) or a .npy file. "
               "GET /info lists the limits; a body past one is refused before it is parsed or decoded.")
_FEATURES = {"description": "a features modality, named after it: a (D,) or (T, D) list of numbers"}

PREDICT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": _FIELDS_DOC,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "additionalProperties": _FEATURES, "properties": {
                "text": {"type": "string"},
                "image": {"type": "string", "format": "binary"},
                "audio": {"type": "string", "format": "binary"},
            }}},
            "application/json": {"schema": {"type": "object", "additionalProperties": _FEATURES, "properties": {
                "text": {"type": "string"},
                "image": {"type": "string", "format": "byte", "description": "base64 of the image file"},
                "audio": {"type": "string", "format": "byte", "description": "base64 of the audio file"},
            }}},
        },
    },
    "responses": {
        "200": {"description": "label and probabilities (classification) or value(s) (regression), the "
                               "modalities used, and with ?explain=1 each one's Shapley contribution"},
        "413": {"description": "over a limit: the body, JSON nesting/number length/value count, image pixels or "
                               "decoded bytes (decompression bombs), audio length, sample rate or decoded bytes, "
                               "text length"},
        "415": {"description": "neither multipart/form-data nor application/json"},
        "422": {"description": "unknown field, a modality the model lacks, invalid JSON, a wrong type, an "
                               "undecodable file, a sample rate below the minimum"},
        "503": {"description": "the model is not loaded yet, or the server is busy (its queue is full): retry "
                               "after the Retry-After header's seconds",
                "headers": {"Retry-After": {"description": "seconds to wait (when busy)",
                                            "schema": {"type": "integer"}}}},
        "504": {"description": "the prediction did not finish within the timeout (nothing more runs for it)"},
    },
}
