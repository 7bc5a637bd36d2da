"""Hugging Face audio encoder ``hf_audio`` (wav2vec2, HuBERT, ... reading raw waveforms).

Loading rules and preprocessing checks are shared: see ``hf_common``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from mmfuse.core.contracts import EncoderContext, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.masking import masked_mean
from mmfuse.core.registry import ENCODERS
from mmfuse.encoders.base import Encoder, finish_features
from mmfuse.encoders.pretrained.base import DType, Trainable, require_kind
from mmfuse.encoders.pretrained.hf_common import (
    Init,
    _HFEncoder,
    _load_processor,
    _prepare,
    load_hf_model,
)


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
        if not raw:
            self.export_blocker = ("its model reads features that the Hugging Face feature extractor computes "
                                   "in numpy, outside any graph")

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
