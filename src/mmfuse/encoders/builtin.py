"""Small encoders that train from scratch on a CPU in seconds.

They exist so the whole pipeline runs without pretrained weights. Absent samples in a batch never
influence present ones, in training mode too: the encoders use GroupNorm/LayerNorm (per-sample
statistics), ``lenet`` runs its network (BatchNorm by default) on the present rows only, and
float inputs of absent rows are zeroed before any layer, so NaN or inf there cannot turn a weight
gradient into NaN (a NaN row times a zero output gradient is still NaN).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import EncoderContext, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.masking import masked_mean, zero_absent
from mmfuse.core.registry import ENCODERS
from mmfuse.core.tracing import capturing_graph, eager_all
from mmfuse.data.audio import SILENCE_LOG_MEL
from mmfuse.encoders.base import Encoder, finish_features


def _require_kind(context: EncoderContext, kind: str, name: str) -> None:
    if context.kind != kind:
        raise ConfigError(f"encoder '{name}' reads {kind} but the modality is of kind '{context.kind}'")


class TextTransformerEncoder(Encoder):
    """Token embeddings + learned positions + a small pre-norm Transformer encoder.

    input_ids (B, L) long, attention_mask (B, L) bool -> tokens (B, L, dim), pooled (B, dim).
    """

    kind = "text"

    def __init__(self, vocab_size: int, max_length: int, dim: int, layers: int, heads: int,
                 ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.out_dim = dim
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * ff_mult, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(positions)[None]
        # A row with no valid token would make attention softmax over nothing (NaN): let such rows
        # attend to their first (padding) position; their output is zeroed by finish_features.
        attend = mask.clone()
        attend[:, 0] |= ~mask.any(dim=1)
        x = self.norm(self.encoder(x, src_key_padding_mask=~attend))
        return finish_features(x, mask, masked_mean(x, mask), present)


class TextGRUEncoder(Encoder):
    """Token embeddings + a bidirectional GRU; tokens are the per-step outputs projected to dim."""

    kind = "text"
    export_blocker = ("its packed GRU needs each text's length as a Python number, and the exporter unrolls "
                      "a GRU over a fixed number of steps, so no graph can serve texts of any length; "
                      "train with text_transformer to export")

    def __init__(self, vocab_size: int, dim: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.out_dim = dim
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True, bidirectional=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        lengths = mask.sum(dim=1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        output, _ = self.gru(packed)
        unpacked, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=ids.shape[1])
        x = self.proj(unpacked)
        return finish_features(x, mask, masked_mean(x, mask), present)


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.GroupNorm(min(8, out_ch), out_ch),
        nn.GELU(),
        nn.MaxPool2d(2),
    )


class ImageCNNEncoder(Encoder):
    """A few conv blocks; tokens are the cells of the final feature map.

    pixels (B, C, H, W) -> tokens (B, H/2^n * W/2^n, dim), pooled (B, dim) = max over the cells.
    """

    kind = "image"

    def __init__(self, in_channels: int, dim: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.out_dim = dim
        widths = (in_channels, *channels)
        self.body = nn.Sequential(*(_conv_block(a, b) for a, b in itertools.pairwise(widths)))
        self.proj = nn.Linear(widths[-1], dim)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        grid = self.body(zero_absent(inputs["pixels"], present))  # (B, C, h, w)
        x = self.proj(grid.flatten(2).transpose(1, 2))
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        # Max over cells, not mean: a local cue (a corner, an edge) anywhere in the image should
        # count fully; averaging dilutes it and made training stall for some seeds (measured).
        return finish_features(x, mask, x.amax(dim=1), present)


def _standardise(mel: Tensor, frame_mask: Tensor) -> Tensor:
    """Per-clip zero mean, unit variance over the valid frames; padding frames become 0.

    Log-mel levels depend on recording gain; standardising removes that nuisance and keeps the
    first conv layer in a well-scaled regime whatever the microphone.
    """
    weights = frame_mask[:, None, :].to(mel.dtype)
    count = (weights.sum(dim=(1, 2), keepdim=True) * mel.shape[1]).clamp(min=1.0)
    mean = (mel * weights).sum(dim=(1, 2), keepdim=True) / count
    var = (((mel - mean) * weights) ** 2).sum(dim=(1, 2), keepdim=True) / count
    return (mel - mean) / (var + 1e-5).sqrt() * weights


class _MaskedConvBlock(nn.Module):
    """The audio conv block with time padding masked out: conv, GroupNorm, GELU, 2x2 max-pool.

    GroupNorm statistics are taken over valid frames only and padding never wins a max-pool, so a
    clip gives the same features however much padding its batch adds (``pad_mode: longest``).
    x (B, C, F, T), mask (B, T) -> x (B, C', F // 2, ceil(T / 2)), mask (B, ceil(T / 2)).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(min(8, out_ch), out_ch)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        keep = mask[:, None, None, :]
        x = self.conv(x)
        batch, channels, freq, steps = x.shape
        padded = not eager_all(mask)
        if padded:
            # GroupNorm over the valid frames only, folded into one per-channel scale and shift.
            # Statistics in float32 whatever the autocast dtype, as nn.GroupNorm does.
            groups = self.norm.num_groups
            x = x.float()
            masked = x * keep
            count = (mask.sum(dim=1, keepdim=True) * (channels // groups * freq)).clamp(min=1).float()
            mean = masked.reshape(batch, groups, -1).sum(dim=-1) / count
            var = ((masked * x).reshape(batch, groups, -1).sum(dim=-1) / count - mean.square()).clamp(min=0.0)
            scale = (var + self.norm.eps).rsqrt().repeat_interleave(channels // groups, dim=1) * self.norm.weight
            shift = self.norm.bias - mean.repeat_interleave(channels // groups, dim=1) * scale
            x = nn.functional.gelu(torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None]))
            # Padding never wins the max.
            x = x.masked_fill(~keep, torch.finfo(x.dtype).min)
        else:  # no padding in the batch: plain GroupNorm gives the same result, faster
            x = nn.functional.gelu(self.norm(x))
        # An odd last frame gets a pooling window of its own, as if the clip were unpadded.
        if capturing_graph():
            x, mask = _pool_any_length(x, mask)
        else:
            if steps % 2:
                x = nn.functional.pad(x, (0, 1), value=torch.finfo(x.dtype).min)
                mask = nn.functional.pad(mask, (0, 1), value=False)
            x = nn.functional.max_pool2d(x, 2)
            mask = mask.reshape(batch, -1, 2).any(dim=-1)
        return (x.masked_fill(~mask[:, None, None, :], 0.0) if padded else x), mask


def _pool_any_length(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The 2x2 max-pool of ``_MaskedConvBlock`` without a branch on the parity of the frame count.

    A graph being exported has a symbolic frame count, so ``if steps % 2`` cannot be traced: always
    append one padding frame and pool with floor rounding, which drops that frame again when the
    count was even. The windows, and so the values, are those of the eager path.
    """
    x = nn.functional.pad(x, (0, 1), value=torch.finfo(x.dtype).min)
    mask = nn.functional.pad(mask, (0, 1), value=False)
    pooled_mask = nn.functional.max_pool2d(mask[:, None, None, :].float(), (1, 2))[:, 0, 0] > 0
    return nn.functional.max_pool2d(x, 2), pooled_mask


class AudioCNNEncoder(Encoder):
    """Conv blocks over the log-mel image; frequency is averaged away, time steps become tokens.

    mel (B, n_mels, F), frame_mask (B, F) -> tokens (B, ceil(F/2^n), dim), pooled (B, dim). Padding
    frames are masked in every block (normalisation statistics, pooling) and excluded from the
    pooled mean, so the amount of padding never changes a clip's features.
    """

    kind = "audio"

    def __init__(self, dim: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.out_dim = dim
        widths = (1, *channels)
        self.body = nn.ModuleList(_MaskedConvBlock(a, b) for a, b in itertools.pairwise(widths))
        self.proj = nn.Linear(widths[-1], dim)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        mel, mask = zero_absent(inputs["mel"], present), inputs["frame_mask"] & present[:, None]
        grid = _standardise(mel, mask).unsqueeze(1)  # (B, 1, n_mels, F)
        for block in self.body:
            grid, mask = block(grid, mask)  # (B, C, n_mels', T'), (B, T')
        x = self.proj(grid.mean(dim=2).transpose(1, 2))  # (B, T', dim)
        return finish_features(x, mask, masked_mean(x, mask), present)


@ENCODERS.register("text_transformer")
def text_transformer(context: EncoderContext, dim: int = 64, layers: int = 2, heads: int = 4,
                     ff_mult: int = 2, dropout: float = 0.1) -> Encoder:
    _require_kind(context, "text", "text_transformer")
    if dim % heads:
        raise ConfigError(f"text_transformer: dim ({dim}) must be divisible by heads ({heads})")
    return TextTransformerEncoder(context.vocab_size, context.max_length, dim, layers, heads, ff_mult, dropout)


@ENCODERS.register("text_gru")
def text_gru(context: EncoderContext, dim: int = 64, layers: int = 1, dropout: float = 0.1) -> Encoder:
    _require_kind(context, "text", "text_gru")
    return TextGRUEncoder(context.vocab_size, dim, layers, dropout)


@ENCODERS.register("image_cnn")
def image_cnn(context: EncoderContext, dim: int = 64, channels: tuple[int, ...] = (16, 32, 64)) -> Encoder:
    _require_kind(context, "image", "image_cnn")
    if not channels:
        raise ConfigError("image_cnn: 'channels' needs at least one width")
    return ImageCNNEncoder(context.channels, dim, tuple(channels))


@ENCODERS.register("audio_cnn")
def audio_cnn(context: EncoderContext, dim: int = 64, channels: tuple[int, ...] = (16, 32, 64)) -> Encoder:
    _require_kind(context, "audio", "audio_cnn")
    if not channels:
        raise ConfigError("audio_cnn: 'channels' needs at least one width")
    return AudioCNNEncoder(dim, tuple(channels))


# ---- MultiBench's LeNet ---------------------------------------------------------------------------
# MultiBench's LeNet, the encoder of its AV-MNIST recipes, for images and for spectrograms.
#
# ``LeNet(in_channels, channels, additional_layers)``: a 5x5 conv to ``channels`` then
# ``additional_layers`` 3x3 convs doubling the width, each followed by BatchNorm, ReLU and a 2x2
# max-pool, no bias in the convs. On 28x28 images LeNet(1, 6, 3) ends at 48 x 1 x 1 (48-d); on
# 112x112 spectrograms LeNet(1, 6, 5) ends at 192 x 1 x 1 (192-d), the dims MultiBench's fusion
# heads expect. The last feature map is max-pooled to one vector, which equals MultiBench's
# ``squeeze`` when the map is 1x1 and keeps other input sizes working.
#
# The registered ``lenet`` encoder reads an image modality (pixels (B, C, H, W)) or an audio modality
# (mel (B, n_mels, T) seen as a one-channel image, padding frames set to the log-mel of silence, as
# the collator pads). ``norm='batch'`` is MultiBench's choice; ``norm='group'`` uses per-sample
# statistics. Either way the network runs on the present rows only, so in training mode BatchNorm's
# batch statistics and running statistics come from present rows, never from absent ones.


class LeNet(nn.Module):
    """x (B, in_channels, H, W) -> (B, channels * 2**additional_layers)."""

    def __init__(self, in_channels: int, channels: int, additional_layers: int,
                 norm: Literal["batch", "group"] = "batch") -> None:
        super().__init__()
        widths = [channels * 2**i for i in range(additional_layers + 1)]
        convs = [nn.Conv2d(in_channels, widths[0], kernel_size=5, padding=2, bias=False)]
        convs += [nn.Conv2d(a, b, kernel_size=3, padding=1, bias=False) for a, b in itertools.pairwise(widths)]
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(w) if norm == "batch" else nn.GroupNorm(math.gcd(4, w), w) for w in widths
        )
        self.out_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nn.functional.max_pool2d(torch.relu(norm(conv(x))), 2)
        return x.amax(dim=(2, 3))


class LeNetEncoder(Encoder):
    """pixels (B, C, H, W) or mel (B, n_mels, T) -> pooled (B, D), tokens (B, 1, D)."""

    def __init__(self, kind: str, in_channels: int, channels: int, additional_layers: int,
                 norm: Literal["batch", "group"], scale: float) -> None:
        super().__init__()
        self.kind = kind
        self.scale = scale
        self.net = LeNet(in_channels, channels, additional_layers, norm)
        self.out_dim = self.net.out_dim

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        if self.kind == "image":
            x = inputs["pixels"]
        else:  # padding frames (and garbage there) become what silence gives
            mel = inputs["mel"]
            x = torch.where(inputs["frame_mask"][:, None, :], mel, torch.full((), SILENCE_LOG_MEL, dtype=mel.dtype,
                                                                               device=mel.device)).unsqueeze(1)
        pooled = self._present_rows(x * self.scale if self.scale != 1.0 else x, present)
        tokens = pooled[:, None, :]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return finish_features(tokens, mask, pooled, present)

    def _present_rows(self, x: Tensor, present: Tensor) -> Tensor:
        """(B, out_dim) network outputs of the present rows; absent rows get zeros and never run.

        In training mode BatchNorm normalises with the statistics of its whole batch and folds them
        into its running statistics: fed every row, the absent rows' inputs (zeros from the collator,
        or anything else) would move the present rows' features and the statistics kept for eval.
        A batch without any present row runs nothing, so the statistics stay as they were.
        """
        if eager_all(present):
            return self.net(x)
        if capturing_graph():  # an exported graph (eval mode only) runs every row and masks the output
            return torch.where(present[:, None], self.net(x), torch.zeros((), dtype=x.dtype, device=x.device))
        out = x.new_zeros(x.shape[0], self.out_dim)
        rows = present.nonzero().flatten()
        if rows.numel():
            out = out.index_copy(0, rows, self.net(x.index_select(0, rows)).to(out.dtype))
        return out


@ENCODERS.register("lenet")
def lenet(context: EncoderContext, channels: int = 6, layers: int | None = None,
          norm: Literal["batch", "group"] = "batch", scale: float = 1.0) -> Encoder:
    """MultiBench's LeNet; ``layers`` (additional 3x3 convs) defaults to 3 for images, 5 for audio.

    ``scale`` multiplies the input first (e.g. 1/255 for the 0..255 AV-MNIST spectrograms, as
    MultiBench's loader divides by 255).
    """
    if context.kind not in ("image", "audio"):
        raise ConfigError(f"encoder 'lenet' reads image or audio but the modality is of kind '{context.kind}'")
    if channels < 1:
        raise ConfigError(f"lenet: channels must be >= 1, got {channels}")
    if norm not in ("batch", "group"):
        raise ConfigError(f"lenet: norm must be 'batch' or 'group', got '{norm}'")
    depth = layers if layers is not None else (3 if context.kind == "image" else 5)
    if depth < 0:
        raise ConfigError(f"lenet: layers must be >= 0, got {depth}")
    in_channels = context.channels if context.kind == "image" else 1
    return LeNetEncoder(context.kind, in_channels, channels, depth, norm, scale)


DEFAULT_ENCODERS = {"text": "text_transformer", "image": "image_cnn", "audio": "audio_cnn"}
