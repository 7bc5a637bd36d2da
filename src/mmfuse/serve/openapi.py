"""The OpenAPI description of ``POST /predict``, whose body the route parses itself (two formats)."""

from __future__ import annotations

from typing import Any

_FIELDS_DOC = ("One field per modality the model reads, named after it (GET /info lists them); give any "
               "subset. Text as a string; image and audio as files (multipart) or base64 strings (JSON); "
               "features as a (D,) or (T, D) list of numbers.")

PREDICT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": _FIELDS_DOC,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "text": {"type": "string"},
                "image": {"type": "string", "format": "binary"},
                "audio": {"type": "string", "format": "binary"},
            }}},
            "application/json": {"schema": {"type": "object", "properties": {
                "text": {"type": "string"},
                "image": {"type": "string", "format": "byte", "description": "base64 of the image file"},
                "audio": {"type": "string", "format": "byte", "description": "base64 of the audio file"},
            }}},
        },
    },
    "responses": {
        "200": {"description": "label and probabilities (classification) or value(s) (regression), the "
                               "modalities used, and with ?explain=1 each one's Shapley contribution"},
        "413": {"description": "body, image pixels, audio length or text over the limit"},
        "415": {"description": "neither multipart/form-data nor application/json"},
        "422": {"description": "unknown field, a modality the model lacks, an undecodable file"},
        "503": {"description": "the model is not loaded yet"},
        "504": {"description": "the prediction took longer than the timeout"},
    },
}
