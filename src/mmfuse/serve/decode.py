"""Given fields -> the preprocessed inputs of one sample, with the server's size limits.

Decoding goes through the same functions as training and ``mmfuse predict`` (only the source is
memory instead of a path), so a served prediction equals the command line's for the same files.
Every limit is checked from what the client sent (a header, a length) before the work it bounds,
and the request's deadline before each field, so a request that already timed out stops here.
"""

from __future__ import annotations

import io

import numpy as np

from mmfuse.core.errors import DataError, InputTooLarge
from mmfuse.data.audio import decode_waveform_bytes
from mmfuse.data.dataset import Sample
from mmfuse.data.image import decode_image_bytes
from mmfuse.data.preprocess import ModalityInputs, Preprocessor, RawInput
from mmfuse.serve.guard import public_message
from mmfuse.serve.inputs import BadRequest, Field
from mmfuse.serve.settings import ServeSettings
from mmfuse.serve.stages import Deadline

_NPY_HEADER_BYTES = 4096
"""A (T, D) array's .npy header is ~128 bytes; numpy's own cap is 10,000."""


def build_request_sample(preprocessor: Preprocessor, fields: dict[str, Field], settings: ServeSettings,
                         sample_id: str = "request", deadline: Deadline | None = None) -> Sample:
    """One sample from the given fields; modalities not given are absent. Past ``deadline`` (checked
    before each field is decoded and encoded) ``DeadlineExceeded`` is raised and nothing more runs."""
    inputs: dict[str, ModalityInputs | None] = dict.fromkeys(preprocessor.modalities)
    for modality, field in fields.items():
        if deadline is not None:
            deadline.check()
        raw = decode_field(preprocessor, modality, field, settings)
        if deadline is not None:
            deadline.check()
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
            return decode_image_bytes(value, field.label, preprocessor.image, settings.max_image_pixels,
                                      settings.max_decode_bytes)
        if kind == "audio":
            assert isinstance(value, bytes)
            rates = (settings.min_sample_rate, settings.max_sample_rate)
            return decode_waveform_bytes(value, field.label, preprocessor.audio, settings.max_audio_seconds,
                                         settings.max_decode_bytes, rates)
        if kind == "features":
            return features_array(value, field.label, settings.max_decode_bytes)
    except InputTooLarge as exc:
        raise BadRequest(413, f"field '{modality}': {exc}") from None
    except DataError as exc:
        raise BadRequest(422, f"field '{modality}': {exc}") from None
    raise BadRequest(422, f"field '{modality}': modality kind '{kind}' cannot be served")


def features_array(value: bytes | str | list[object], label: str, max_bytes: int) -> np.ndarray:
    """A nested list, or the bytes of a ``.npy`` file (``read_npy``) -> a finite float32 array."""
    try:
        array = read_npy(value, label, max_bytes) if isinstance(value, bytes) else np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DataError(f"{label} is not a numeric array ({public_message(str(exc))[:200]})") from None
    if array.dtype.kind not in "fiub":
        raise DataError(f"{label} holds {array.dtype} values, not numbers")
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise DataError(f"{label} holds NaN, infinite or out-of-range values (float32 reaches 3.4e38)")
    return array


def read_npy(data: bytes, label: str, max_bytes: int) -> np.ndarray:
    """The array in the bytes of a ``.npy`` file, read without pickles (uploads are untrusted) and
    without trusting its header: the shape it claims must match the bytes that follow exactly, so a
    128-byte file claiming 1e11 floats is refused before anything is allocated. Plain numeric dtypes
    of 1 or 2 dimensions only; at most ``max_bytes`` once converted to float32."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_NPY_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_NPY_HEADER_BYTES)
        else:
            raise DataError(f"{label}: .npy format version {version[0]}.{version[1]} is not read here (1.0 or 2.0)")
    except DataError:
        raise
    except Exception as exc:  # numpy parses the header with ast and tokenize: TokenError, SyntaxError, ...
        raise DataError(f"{label} is not a readable .npy file ({public_message(str(exc))[:200]})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "fiub":
        raise DataError(f"{label} holds {dtype} values, not plain numbers")
    if len(shape) not in (1, 2):
        raise DataError(f"{label}: features must be (T, D) or (D,), the file's header says {tuple(shape)}")
    count = int(np.prod(shape, dtype=object))
    if count * 4 > max_bytes:
        raise InputTooLarge(f"{label}: an array of {tuple(shape)} is {count * 4:,} bytes as float32; the limit is "
                            f"{max_bytes:,}")
    held = len(data) - stream.tell()
    if count * dtype.itemsize != held:
        raise DataError(f"{label}: the .npy header claims {tuple(shape)} {dtype} = {count * dtype.itemsize:,} bytes "
                        f"but {held:,} follow it")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")
