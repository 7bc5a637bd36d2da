"""Shared loading of Hugging Face encoders (hf_text, sentence_transformers, hf_image, hf_audio).

Each takes ``model``: a hub name (from the local cache only; nothing downloads), a local folder
(``save_pretrained`` layout) or ``package:<module>`` (see ``mmfuse.core.hub``), and loads it with
``AutoModel``. ``init: random`` builds the architecture from the folder's config.json with random
weights (throughput benchmarks, from-scratch baselines). The preprocessing must be the model's
own; each factory checks it and says which data key to set when it is not:

- text reads ids of the model's tokenizer: ``data.text.tokenizer`` = the same model;
- images are resized and normalised as the model's image processor says (``data.image.processor``);
- audio models read raw samples: ``data.audio.features: waveform`` at the feature extractor's rate.

Outputs: tokens = the last hidden states (conv feature maps flattened to cells), mask = valid
tokens, pooled = mean over valid tokens by default (``pooling`` selects cls/max/the model's pooler).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from mmfuse.core.contracts import EncoderContext
from mmfuse.core.errors import ConfigError
from mmfuse.core.hub import resolve_source
from mmfuse.encoders.pretrained.base import PretrainedEncoder

Init = Literal["pretrained", "random"]
TextPooling = Literal["mean", "cls", "max", "mean_sqrt_len"]
ImagePooling = Literal["auto", "mean", "cls"]
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError)
ST_SETTINGS_FILE = "sentence_transformers.json"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:400]


def load_hf_model(model: str, context: EncoderContext, where: str, init: Init,
                  attn_implementation: str | None) -> tuple[Any, str]:
    """(the AutoModel, the folder or name it came from).

    Restoring a saved mmfuse model (``context.assets``) builds the architecture from the saved
    config.json with random weights: model.safetensors overwrites them right after.
    """
    from transformers import AutoConfig, AutoModel  # lazy: transformers is slow to import

    options: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    source = context.assets or resolve_source(model, where)
    if context.assets and not (Path(source) / "config.json").is_file():
        raise ConfigError(f"{where}: the saved model lacks {source}/config.json")
    try:
        if context.assets or init == "random":
            config = AutoConfig.from_pretrained(source)
            return AutoModel.from_config(config, **options), source
        return AutoModel.from_pretrained(source, **options), source
    except _LOAD_ERRORS as exc:
        hint = ("" if Path(source).exists() else
                " (hub names load from the local cache only; give a local folder with config.json and weights)")
        raise ConfigError(f"{where}: cannot load the Hugging Face model '{model}': {_reason(exc)}{hint}") from None


def _load_processor(kind: str, source: str) -> Any | None:
    """The folder's AutoImageProcessor / AutoFeatureExtractor, or None when it has none."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    loader = AutoImageProcessor if kind == "image" else AutoFeatureExtractor
    try:
        return loader.from_pretrained(source)
    except _LOAD_ERRORS:
        return None


def _prepare(top: Any, name: str, gradient_checkpointing: bool) -> None:
    if not gradient_checkpointing:
        return
    if not getattr(top, "supports_gradient_checkpointing", False):
        raise ConfigError(f"encoder '{name}': {type(top).__name__} does not support gradient checkpointing")
    # transformers 5 renamed it (the old name still works there, with a FutureWarning).
    if hasattr(top, "activation_checkpointing_enable"):
        top.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        top.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class _HFEncoder(PretrainedEncoder):
    """Keeps the loaded model's top-level config (and processor) to write into the saved model folder."""

    def __init__(self, top_config: Any, processor: Any | None) -> None:
        super().__init__()
        self._top_config = top_config
        self._processor = processor

    def save_assets(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._top_config.save_pretrained(str(folder))
        if self._processor is not None:
            self._processor.save_pretrained(str(folder))
