"""What a served model accepts and how it batches: one place for every limit, shown by ``/info``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.serve.security import SecuritySettings


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of ``mmfuse serve``.

    The limits exist so that no request can take the server down, and each is checked before the
    work it bounds: a body is refused past ``max_body_bytes`` while it streams in; a JSON body (or a
    form's features field) past ``max_json_depth`` levels of nesting, a number literal longer than
    ``max_json_number_chars`` or more than ``max_json_values`` values, before it is parsed; an image
    past ``max_image_pixels`` and a clip past ``max_audio_seconds`` from their headers, and either
    when its decoded samples would exceed ``max_decode_bytes`` (width x height x bytes per pixel as
    Pillow holds it; frames x channels x 4 for audio, plus the resampled clip), before any pixel or
    sample is decoded. Audio sample rates outside ``min_sample_rate``..``max_sample_rate`` are refused
    from the header: a rate is what resampling costs. ``max_queue`` requests may wait for the decode
    threads and as many for the model; past that a request gets 503 with ``Retry-After`` at once.
    ``max_batch_size`` 1 turns micro-batching off.
    """

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 60.0
    max_text_chars: int = 20_000
    max_decode_bytes: int = 256 * 1024 * 1024
    min_sample_rate: int = 8_000
    max_sample_rate: int = 192_000
    max_json_depth: int = 8
    """A valid body needs 3: the object of fields, a (T, D) features list and its rows."""
    max_json_number_chars: int = 64
    max_json_values: int = 1_000_000
    max_queue: int = 64
    decode_workers: int = 2
    """Threads decoding uploads at once: each holds at most ``max_decode_bytes`` (x a small factor)."""
    timeout_s: float = 30.0
    onnx: Path | None = None
    threads: int | None = None
    """CPU threads of onnxruntime (``onnx``); PyTorch's are set by the command around the server."""
    security: SecuritySettings = field(default_factory=SecuritySettings)
    """API keys, allowed Host names and CORS origins (``mmfuse.serve.security``); the default lets anyone in."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_body_bytes", "max_image_pixels", "max_text_chars", "max_decode_bytes",
                     "min_sample_rate", "max_json_depth", "max_json_number_chars", "max_json_values", "max_queue",
                     "decode_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_audio_seconds", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_sample_rate < self.min_sample_rate:
            raise ValueError(f"max_sample_rate ({self.max_sample_rate}) must be >= min_sample_rate "
                             f"({self.min_sample_rate})")

    def limits(self) -> dict[str, Any]:
        """The input limits as ``/info`` reports them."""
        values = asdict(self)
        return {k: values[k] for k in ("max_body_bytes", "max_image_pixels", "max_audio_seconds", "max_text_chars",
                                       "max_decode_bytes", "min_sample_rate", "max_sample_rate", "max_json_depth",
                                       "max_json_number_chars", "max_json_values", "timeout_s")}

    def batching(self) -> dict[str, Any]:
        """Batching and queueing as ``/info`` reports them."""
        return {"max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_ms, "max_queue": self.max_queue,
                "decode_workers": self.decode_workers}
