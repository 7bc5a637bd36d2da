"""Hugging Face encoders: hf_text, sentence_transformers, hf_image, hf_audio.

Each takes ``model``: a hub name (from the local cache only; nothing downloads), a local folder
(``save_pretrained`` layout) or ``package:<module>`` (see ``mmfuse.hub``), and loads it with
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

import inspect
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mmfuse.data.pretrained_prep import processor_settings
from mmfuse.encoders.base import ENCODERS, Encoder, EncoderContext, finish_features, masked_mean
from mmfuse.encoders.pretrained import DType, PretrainedEncoder, Trainable, require_kind
from mmfuse.errors import ConfigError
from mmfuse.hub import resolve_source
from mmfuse.types import Features

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

    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
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


# ---- text ---------------------------------------------------------------------------------------

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


# ---- image --------------------------------------------------------------------------------------

class HFImageEncoder(_HFEncoder):
    """pixels (B, C, H, W) -> tokens (B, cells or patches, D), pooled (B, D)."""

    kind = "image"

    def __init__(self, top: Any, backbone: Any, processor: Any | None, pooling: ImagePooling,
                 channels_last: bool) -> None:
        super().__init__(top.config, processor)
        self.backbone = backbone
        config = backbone.config
        sizes = getattr(config, "hidden_sizes", None)
        self.out_dim = int(sizes[-1] if sizes and not hasattr(config, "hidden_size") else config.hidden_size)
        self.pooling = pooling
        self.use_channels_last(channels_last)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        pixels = self.pixels_for_backbone(inputs["pixels"])
        with self.backbone_context():
            out = self.backbone(pixel_values=pixels)
        hidden = out.last_hidden_state.float()
        tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden
        pooler = getattr(out, "pooler_output", None)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "auto" and pooler is not None and pooler.flatten(1).shape[1] == tokens.shape[2]:
            pooled = pooler.flatten(1).float()
        else:
            pooled = tokens.mean(dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return finish_features(tokens.contiguous(), mask, pooled, present)


@ENCODERS.register("hf_image")
def hf_image(context: EncoderContext, model: str, trainable: Trainable = "frozen", n_layers: int = 1,
             pooling: ImagePooling = "auto", init: Init = "pretrained", dtype: DType = "float32",
             gradient_checkpointing: bool = False, attn_implementation: str | None = None,
             channels_last: bool = False) -> Encoder:
    """Any transformers vision model: ViT, DeiT, ConvNeXt, ResNet, Swin, CLIP's vision tower."""
    require_kind(context, "image", "hf_image")
    top, source = load_hf_model(model, context, "encoders.image.model", init, attn_implementation)
    backbone = top.vision_model if hasattr(top, "vision_model") and not hasattr(top.config, "num_channels") else top
    config = backbone.config
    channels = int(getattr(config, "num_channels", 3))
    if context.channels != channels:
        raise ConfigError(f"encoder 'hf_image': '{model}' reads {channels}-channel images but data.image.mode "
                          f"gives {context.channels}: set data.image.mode: {'rgb' if channels == 3 else 'grayscale'}")
    fixed = any("position_embedding" in pname for pname, _ in backbone.named_parameters())
    size = getattr(config, "image_size", None)
    size = size[0] if isinstance(size, list | tuple) else size
    if fixed and size and context.image_size != int(size):
        raise ConfigError(f"encoder 'hf_image': '{model}' needs {size}x{size} images but data.image.size is "
                          f"{context.image_size}: set data.image.processor: {model} (or data.image.size: {size})")
    processor = _load_processor("image", source)
    if processor is not None:
        _check_image_normalisation(context, processor, model)
    _prepare(top, "hf_image", gradient_checkpointing)
    encoder = HFImageEncoder(top, backbone, processor, pooling, channels_last)
    encoder.setup("hf_image", trainable, n_layers, dtype)
    return encoder


def _check_image_normalisation(context: EncoderContext, processor: Any, model: str) -> None:
    expected = processor_settings(processor, model)
    channels = context.channels
    mean = tuple(expected["mean"]) * (channels if len(expected["mean"]) == 1 else 1)
    std = tuple(expected["std"]) * (channels if len(expected["std"]) == 1 else 1)
    if not (np.allclose(mean, context.image_mean, atol=1e-4) and np.allclose(std, context.image_std, atol=1e-4)):
        raise ConfigError(f"encoder 'hf_image': data.image normalises with mean {context.image_mean} and std "
                          f"{context.image_std} but '{model}' was trained with mean {mean} and std {std}: "
                          f"set data.image.processor: {model}")


# ---- audio --------------------------------------------------------------------------------------

class HFAudioEncoder(_HFEncoder):
    """waveform (B, S), sample_mask (B, S) -> tokens (B, frames, D), pooled (B, D) over valid frames.

    Raw-sample models (wav2vec2, HuBERT, WavLM, data2vec-audio) read the waveform directly,
    normalised per clip over its valid samples as their feature extractor does. Models that read
    spectrogram features (Whisper, AST, CLAP) get them from their own feature extractor, run
    per batch on the CPU (not differentiable, and these extractors pad or crop to their fixed
    length, so their tokens cover that length).
    """

    kind = "audio"

    def __init__(self, top: Any, backbone: Any, extractor: Any, raw: bool) -> None:
        super().__init__(top.config, extractor)
        self.backbone = backbone
        self.extractor = extractor
        self.raw = raw
        self.sample_rate = int(extractor.sampling_rate)
        self.normalise = bool(getattr(extractor, "do_normalize", False))
        self.pass_mask = bool(getattr(extractor, "return_attention_mask", False))
        config = backbone.config
        self.out_dim = int(getattr(config, "hidden_size", 0) or config.d_model)
        accepted = inspect.signature(backbone.forward).parameters
        self._accepted = set(accepted)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        wave, valid = inputs["waveform"], inputs["sample_mask"]
        tokens, mask = self._raw(wave, valid) if self.raw else self._extracted(wave, valid)
        mask = mask & valid.any(dim=1, keepdim=True)
        return finish_features(tokens, mask, masked_mean(tokens, mask), present)

    def _raw(self, wave: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        weights = valid.to(wave.dtype)
        if self.normalise:  # zero mean, unit variance over the valid samples (Wav2Vec2FeatureExtractor)
            count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
            mean = (wave * weights).sum(dim=1, keepdim=True) / count
            var = (((wave - mean) * weights) ** 2).sum(dim=1, keepdim=True) / count
            wave = (wave - mean) / (var + 1e-7).sqrt()
        wave = wave * weights
        kwargs: dict[str, Tensor] = {}
        if self.pass_mask:
            attend = valid.clone()
            attend[:, 0] |= ~valid.any(dim=1)
            kwargs["attention_mask"] = attend.long()
        with self.backbone_context():
            hidden = self.backbone(input_values=self.to_backbone_dtype(wave), **kwargs).last_hidden_state
        hidden = hidden.float()
        lengths = self.backbone._get_feat_extract_output_lengths(valid.sum(dim=1))
        steps = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden, steps[None, :] < lengths[:, None]

    def _extracted(self, wave: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        lengths = valid.sum(dim=1).tolist()
        clips = [wave[i, : max(int(n), 1)].detach().float().cpu().numpy() for i, n in enumerate(lengths)]
        features = self.extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt",
                                  return_attention_mask=True)
        kwargs = {k: v.to(wave.device) for k, v in features.items() if k in self._accepted and k != "attention_mask"}
        kwargs = {k: self.to_backbone_dtype(v) for k, v in kwargs.items()}
        with self.backbone_context():
            hidden = self.backbone(**kwargs).last_hidden_state
        hidden = hidden.float()
        tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        frame_mask = features.get("attention_mask")
        if frame_mask is not None and frame_mask.shape[1] >= tokens.shape[1]:
            stride = max(1, round(frame_mask.shape[1] / tokens.shape[1]))
            down = frame_mask[:, ::stride][:, : tokens.shape[1]].bool().to(tokens.device)
            if down.shape[1] == tokens.shape[1]:
                mask = down
        return tokens, mask


@ENCODERS.register("hf_audio")
def hf_audio(context: EncoderContext, model: str, trainable: Trainable = "frozen", n_layers: int = 1,
             init: Init = "pretrained", dtype: DType = "float32", gradient_checkpointing: bool = False,
             attn_implementation: str | None = None, freeze_feature_encoder: bool = False) -> Encoder:
    """Any transformers audio encoder: wav2vec2, HuBERT, WavLM, AST, Whisper's encoder, CLAP's audio tower.

    ``freeze_feature_encoder`` keeps wav2vec2-style conv front ends fixed while the transformer
    trains: the usual fine-tuning recipe, and it removes the conv stack's backward pass, which
    dominates a wav2vec2 training step on a GPU.
    """
    require_kind(context, "audio", "hf_audio")
    top, source = load_hf_model(model, context, "encoders.audio.model", init, attn_implementation)
    backbone = top
    if getattr(top.config, "is_encoder_decoder", False) and hasattr(top, "get_encoder"):
        backbone = top.get_encoder()  # Whisper: the encoder alone
    elif hasattr(top, "audio_model"):
        backbone = top.audio_model  # CLAP: the audio tower
    extractor = _load_processor("audio", source)
    if extractor is None or not hasattr(extractor, "sampling_rate"):
        raise ConfigError(f"encoder 'hf_audio': '{model}' has no feature extractor (preprocessor_config.json); "
                          "it says which sample rate and normalisation the model expects")
    if context.audio_features != "waveform":
        raise ConfigError("encoder 'hf_audio' reads raw samples: set data.audio.features: waveform")
    if context.sample_rate != int(extractor.sampling_rate):
        raise ConfigError(f"encoder 'hf_audio': '{model}' expects {extractor.sampling_rate} Hz audio but "
                          f"data.audio.sample_rate is {context.sample_rate}: set data.audio.sample_rate: "
                          f"{extractor.sampling_rate}")
    # wav2vec2-family models (wav2vec2, HuBERT, WavLM, data2vec-audio) have a conv front end over raw
    # samples; the others (Whisper, AST, CLAP) read their extractor's spectrogram features.
    raw = hasattr(backbone, "feature_extractor") and hasattr(backbone, "_get_feat_extract_output_lengths")
    _prepare(top, "hf_audio", gradient_checkpointing)
    encoder = HFAudioEncoder(top, backbone, extractor, raw)
    encoder.setup("hf_audio", trainable, n_layers, dtype)
    if freeze_feature_encoder:
        freeze = getattr(backbone, "freeze_feature_encoder", None)
        if not callable(freeze):
            raise ConfigError(f"encoder 'hf_audio': '{model}' has no conv feature encoder to freeze")
        freeze()
    return encoder
