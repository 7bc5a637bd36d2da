"""Given fields -> the preprocessed inputs of one sample, with the server's size limits.

Decoding goes through the same functions as training and ``mmfuse predict`` (only the source is
memory instead of a path), so a served prediction equals the command line's for the same files.
"""

from __future__ import annotations

import io

import numpy as np

from mmfuse.core.errors import DataError, InputTooLarge
from mmfuse.data.audio import decode_waveform_bytes
from mmfuse.data.dataset import Sample
from mmfuse.data.image import decode_image_bytes
from mmfuse.data.preprocess import ModalityInputs, Preprocessor, RawInput
from mmfuse.serve.inputs import BadRequest, Field
from mmfuse.serve.settings import ServeSettings


def build_request_sample(preprocessor: Preprocessor, fields: dict[str, Field], settings: ServeSettings,
                         sample_id: str = "request") -> Sample:
    """One sample from the given fields; modalities not given are absent."""
    inputs: dict[str, ModalityInputs | None] = dict.fromkeys(preprocessor.modalities)
    for modality, field in fields.items():
        raw = decode_field(preprocessor, modality, field, settings)
        try:
            inputs[modality] = preprocessor.encode_decoded(modality, raw)
        except DataError as exc:
            raise BadRequest(422, f"field '{modality}': {exc}") from None
    if all(v is None for v in inputs.values()):
        raise BadRequest(422, f"no input holds anything the model can read (given: {', '.join(fields)})")
    return Sample(sample_id, inputs)


def decode_field(preprocessor: Preprocessor, modality: str, field: Field, settings: ServeSettings) -> RawInput:
    """One field -> the raw input ``Preprocessor.encode_decoded`` takes; 413 past a limit, 422 if unreadable."""
    kind = preprocessor.kind(modality)
    value = field.value
    try:
        if kind == "text":
            assert isinstance(value, str)
            if len(value) > settings.max_text_chars:
                raise InputTooLarge(f"text of {len(value):,} characters; the limit is {settings.max_text_chars:,}")
            return value
        if kind == "image":
            assert isinstance(value, bytes)
            return decode_image_bytes(value, field.label, preprocessor.image, settings.max_image_pixels)
        if kind == "audio":
            assert isinstance(value, bytes)
            return decode_waveform_bytes(value, field.label, preprocessor.audio, settings.max_audio_seconds)
        if kind == "features":
            return _features(value, field.label)
    except InputTooLarge as exc:
        raise BadRequest(413, f"field '{modality}': {exc}") from None
    except DataError as exc:
        raise BadRequest(422, f"field '{modality}': {exc}") from None
    raise BadRequest(422, f"field '{modality}': modality kind '{kind}' cannot be served")


def _features(value: bytes | str | list[object], label: str) -> np.ndarray:
    """A nested list, or the bytes of a ``.npy`` file (read without pickles: uploads are untrusted)."""
    try:
        if isinstance(value, bytes):
            array = np.load(io.BytesIO(value), allow_pickle=False)
        else:
            array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError, OSError, EOFError) as exc:
        raise DataError(f"{label} is not a numeric array ({' '.join(str(exc).split())[:200]})") from None
    if array.dtype.kind not in "fiub":
        raise DataError(f"{label} holds {array.dtype} values, not numbers")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise DataError(f"{label} holds NaN or infinite values")
    return array
