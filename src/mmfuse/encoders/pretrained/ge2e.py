"""ge2e_audio: the GE2E speaker encoder (a 3-layer LSTM over 40 mel bands) with pretrained weights.

The architecture is Resemblyzer's ``VoiceEncoder`` (Wan et al. 2018, "Generalized End-to-End Loss
for Speaker Verification"): LSTM(40 -> 256, 3 layers), then Linear(256 -> 256), ReLU and L2
normalisation of the last hidden state. Its pretrained weights ship inside the ``resemblyzer``
wheel as ``pretrained.pt`` (a plain state dict, read with ``weights_only=True``); they are found
through ``package:resemblyzer/pretrained.pt`` without importing resemblyzer, whose import needs
librosa and webrtcvad. Install it with ``pip install --no-deps resemblyzer``.

Resemblyzer feeds mel *power* (librosa's melspectrogram: 16 kHz, 25 ms windows, 10 ms hop, 40
Slaney mel bands) of clips normalised to -30 dBFS. mmfuse's log-mel with n_fft 400, hop 160 and
n_mels 40 at 16 kHz is the log of that (``mmfuse.data.audio``), so the encoder undoes the log;
set ``data.audio.normalize_dbfs: -30`` for the gain normalisation.

tokens = the last LSTM layer's output per frame (B, frames, 256); pooled = the speaker embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import EncoderContext, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.hub import resolve_source
from mmfuse.core.registry import ENCODERS
from mmfuse.data.audio import LOG_FLOOR
from mmfuse.encoders.base import Encoder, finish_features
from mmfuse.encoders.pretrained.base import PretrainedEncoder, Trainable, require_kind

N_MELS, HIDDEN, LAYERS, SAMPLE_RATE, N_FFT, HOP = 40, 256, 3, 16000, 400, 160
DEFAULT_WEIGHTS = "package:resemblyzer/pretrained.pt"


class GE2ENetwork(nn.Module):
    """Resemblyzer's VoiceEncoder network, with the same parameter names as its state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, mels: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """mels (B, T, 40) mel power, lengths (B,) >= 1 -> per-frame outputs (B, T, 256), embeddings (B, 256)."""
        packed = nn.utils.rnn.pack_padded_sequence(mels, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, (hidden, _) = self.lstm(packed)
        frames, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=mels.shape[1])
        embeds = torch.relu(self.linear(hidden[-1]))
        return frames, embeds / embeds.norm(dim=1, keepdim=True).clamp(min=1e-12)


class GE2EAudioEncoder(PretrainedEncoder):
    """mel (B, 40, F) log-mel, frame_mask (B, F) -> tokens (B, F, 256), pooled (B, 256) embedding."""

    kind = "audio"
    export_blocker = ("its packed LSTM needs each clip's length as a Python number, and the exporter unrolls "
                      "an LSTM over a fixed number of frames")

    def __init__(self) -> None:
        super().__init__()
        self.backbone = GE2ENetwork()
        self.out_dim = HIDDEN

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        mel, mask = inputs["mel"], inputs["frame_mask"]
        power = (mel.exp() - LOG_FLOOR).clamp(min=0.0) * mask[:, None, :]
        lengths = mask.sum(dim=1).clamp(min=1)
        with self.backbone_context():
            frames, embeds = self.backbone(power.transpose(1, 2).to(self.dtype), lengths)
        return finish_features(frames.float(), mask, embeds.float(), present)


def _load_state(path: Path) -> dict[str, Tensor]:
    try:
        checkpoint: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or pickled objects: one clear line
        raise ConfigError(f"encoders.audio.weights: cannot read {path}: {' '.join(str(exc).split())[:300]}") from None
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"encoders.audio.weights: {path} is not a GE2E state dict")
    return {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}


@ENCODERS.register("ge2e_audio")
def ge2e_audio(context: EncoderContext, weights: str | None = DEFAULT_WEIGHTS, trainable: Trainable = "frozen",
               n_layers: int = 1) -> Encoder:
    """GE2E speaker encoder; ``weights: null`` gives random weights (a from-scratch LSTM baseline)."""
    require_kind(context, "audio", "ge2e_audio")
    expected = {"features": ("log_mel", context.audio_features), "sample_rate": (SAMPLE_RATE, context.sample_rate),
                "n_mels": (N_MELS, context.n_mels), "n_fft": (N_FFT, context.n_fft),
                "hop_length": (HOP, context.hop_length)}
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        settings = ", ".join(f"data.audio.{k}: {want} (is {got})" for k, (want, got) in wrong.items())
        raise ConfigError(f"encoder 'ge2e_audio' was trained on 16 kHz 40-band mels with 25 ms windows and "
                          f"a 10 ms hop: set {settings}")
    encoder = GE2EAudioEncoder()
    if weights and not context.assets:  # a restored model gets its weights from model.safetensors
        path = Path(resolve_source(weights, "encoders.audio.weights"))
        state = _load_state(path)
        missing, unexpected = encoder.backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"encoders.audio.weights: {path} does not fit GE2E: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    encoder.setup("ge2e_audio", trainable, n_layers, "float32")
    return encoder
