"""What a served model accepts and how it batches: one place for every limit, shown by ``/info``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.serve.security import SecuritySettings


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of ``mmfuse serve``.

    The limits exist so that no request can take the server down: a body is refused past
    ``max_body_bytes`` while it streams in, an image past ``max_image_pixels`` and a clip past
    ``max_audio_seconds`` from their headers, before any pixel or sample is decoded.
    ``max_batch_size`` 1 turns micro-batching off.
    """

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 60.0
    max_text_chars: int = 20_000
    timeout_s: float = 30.0
    onnx: Path | None = None
    threads: int | None = None
    """CPU threads of onnxruntime (``onnx``); PyTorch's are set by the command around the server."""
    security: SecuritySettings = field(default_factory=SecuritySettings)
    """API keys, allowed Host names and CORS origins (``mmfuse.serve.security``); the default lets anyone in."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_body_bytes", "max_image_pixels", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_audio_seconds", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    def limits(self) -> dict[str, Any]:
        """The input limits as ``/info`` reports them."""
        values = asdict(self)
        return {k: values[k] for k in ("max_body_bytes", "max_image_pixels", "max_audio_seconds", "max_text_chars",
                                       "timeout_s")}
