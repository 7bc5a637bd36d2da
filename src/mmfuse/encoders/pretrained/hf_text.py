"""Hugging Face text encoders: ``hf_text`` (any AutoModel text backbone) and ``sentence_transformers``.

Loading rules and preprocessing checks are shared: see ``hf_common``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import EncoderContext, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.masking import masked_mean
from mmfuse.core.registry import ENCODERS
from mmfuse.encoders.base import Encoder, finish_features
from mmfuse.encoders.pretrained.base import DType, Trainable, require_kind
from mmfuse.encoders.pretrained.hf_common import (
    ST_SETTINGS_FILE,
    Init,
    TextPooling,
    _HFEncoder,
    _prepare,
    load_hf_model,
)


class HFTextEncoder(_HFEncoder):
    """input_ids (B, L), attention_mask (B, L) -> tokens (B, L, hidden), pooled (B, hidden)."""

    kind = "text"

    def __init__(self, top: Any, pooling: TextPooling, normalize: bool) -> None:
        super().__init__(top.config, None)
        self.backbone = top
        if getattr(top, "pooler", None) is not None:
            top.pooler = None  # unused (we pool ourselves): no dead parameters in the optimizer
        self.pooling = pooling
        self.normalize = normalize
        self.pad_id = int(getattr(top.config, "pad_token_id", None) or 0)
        self.out_dim = int(top.config.hidden_size)
        self.st_settings: dict[str, Any] | None = None

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        # A row with no token (absent or empty) attends to its first position so attention never
        # normalises over nothing; finish_features zeroes such rows afterwards.
        attend = mask.clone()
        attend[:, 0] |= ~mask.any(dim=1)
        ids = ids.masked_fill(~attend, self.pad_id)
        with self.backbone_context():
            hidden = self.backbone(input_ids=ids, attention_mask=attend.long()).last_hidden_state
        hidden = hidden.float()
        pooled = pool_text(hidden, mask, self.pooling)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return finish_features(hidden, mask, pooled, present)

    def save_assets(self, folder: Path) -> None:
        super().save_assets(folder)
        if self.st_settings is not None:
            (folder / ST_SETTINGS_FILE).write_text(json.dumps(self.st_settings, indent=2))


def pool_text(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Sentence-transformers' pooling modes over the valid tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        filled = hidden.masked_fill(~mask[:, :, None], torch.finfo(hidden.dtype).min)
        return torch.where(mask.any(dim=1, keepdim=True), filled.amax(dim=1), torch.zeros_like(hidden[:, 0]))
    mean = masked_mean(hidden, mask)
    if pooling == "mean_sqrt_len":
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
        return mean * count / count.sqrt()
    return mean


def _check_text_context(context: EncoderContext, config: Any, name: str, model: str) -> None:
    if not context.tokenizer:
        raise ConfigError(f"encoder '{name}' reads the ids of its model's own tokenizer, but data.text uses the "
                          f"built-in word tokenizer: set data.text.tokenizer: {model}")
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab and context.vocab_size > vocab:
        raise ConfigError(f"encoder '{name}': data.text.tokenizer '{context.tokenizer}' has {context.vocab_size} "
                          f"ids but the model '{model}' embeds only {vocab}: use the model's own tokenizer")
    positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    if positions and context.max_length > positions:
        raise ConfigError(f"encoder '{name}': data.text.max_length {context.max_length} exceeds the "
                          f"{positions} positions of '{model}'")


@ENCODERS.register("hf_text")
def hf_text(context: EncoderContext, model: str, trainable: Trainable = "frozen", n_layers: int = 1,
            pooling: TextPooling = "mean", normalize: bool = False, init: Init = "pretrained",
            dtype: DType = "float32", gradient_checkpointing: bool = False,
            attn_implementation: str | None = None) -> Encoder:
    """Any transformers text encoder (BERT, RoBERTa, MiniLM, ...) with its own tokenizer."""
    require_kind(context, "text", "hf_text")
    top, _ = load_hf_model(model, context, "encoders.text.model", init, attn_implementation)
    _check_text_context(context, top.config, "hf_text", model)
    _prepare(top, "hf_text", gradient_checkpointing)
    encoder = HFTextEncoder(top, pooling, normalize)
    encoder.setup("hf_text", trainable, n_layers, dtype)
    return encoder


@ENCODERS.register("sentence_transformers")
def sentence_transformers(context: EncoderContext, model: str, trainable: Trainable = "frozen",
                          n_layers: int = 1, dtype: DType = "float32",
                          gradient_checkpointing: bool = False) -> Encoder:
    """A sentence-transformers folder (e.g. all-MiniLM-L6-v2): its transformer, pooling and normalisation.

    Reads the folder's modules.json / 1_Pooling/config.json directly, so the sentence-transformers
    library is not needed and the pooled vector equals ``SentenceTransformer(folder).encode``
    (tested when the library is installed). A plain transformers folder gets mean pooling.
    """
    require_kind(context, "text", "sentence_transformers")
    top, source = load_hf_model(model, context, "encoders.text.model", "pretrained", None)
    _check_text_context(context, top.config, "sentence_transformers", model)
    _prepare(top, "sentence_transformers", gradient_checkpointing)
    settings = _st_settings(Path(source))
    encoder = HFTextEncoder(top, settings["pooling"], settings["normalize"])
    encoder.st_settings = settings
    encoder.setup("sentence_transformers", trainable, n_layers, dtype)
    return encoder


def _st_settings(folder: Path) -> dict[str, Any]:
    """{'pooling': mean|cls|max|mean_sqrt_len, 'normalize': bool} from a sentence-transformers folder."""
    saved = folder / ST_SETTINGS_FILE
    if saved.is_file():
        return dict(json.loads(saved.read_text()))
    settings: dict[str, Any] = {"pooling": "mean", "normalize": False}
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return settings
    for module in json.loads(modules_file.read_text()):
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            settings["normalize"] = True
        elif kind.endswith("Pooling"):
            pooling = json.loads((folder / module.get("path", "") / "config.json").read_text())
            for mode in ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "mean_tokens"):
                if pooling.get(f"pooling_mode_{mode}"):
                    settings["pooling"] = {"cls_token": "cls", "max_tokens": "max",
                                           "mean_sqrt_len_tokens": "mean_sqrt_len", "mean_tokens": "mean"}[mode]
                    break
        elif not kind.endswith("Transformer"):
            raise ConfigError(f"{folder}: sentence-transformers module '{kind}' is not supported "
                              "(Transformer, Pooling and Normalize are)")
    return settings
