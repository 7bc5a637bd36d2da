"""Per-modality preprocessing (``data.text``, ``data.image``, ``data.audio``, ``data.video``,
``data.features``) and training-time augmentation (``data.augment``) sections of the config.

These are what a saved model's preprocessing, a pack's fingerprint and the feature-cache key are
made of, which is why augmentation is a section of its own: turning it on changes none of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmfuse.config.strict import StrictModel


class TextPrep(StrictModel):
    """Built-in word tokenizer settings; the vocabulary is fitted on the training split.

    ``tokenizer`` names a pretrained tokenizer instead (a hub name, a local folder or
    ``package:<module>``): pretrained text encoders must read the ids their own tokenizer makes.
    Its files are saved inside the model folder, so a saved model never needs the original.
    """

    max_length: int = Field(64, gt=0)
    tokenizer: str | None = Field(None, description="pretrained tokenizer (hub name, folder, package:<module>)")
    lowercase: bool = True
    min_freq: int = Field(1, ge=1)
    max_vocab: int = Field(30000, gt=2)


class ImagePrep(StrictModel):
    """Resize, centre-crop to size x size, then (x / 255 - mean) / std (one value or one per channel).

    ``resize: squash`` (the default) resizes to resize_size x resize_size, distorting a non-square
    image; ``shortest_edge`` resizes the shorter side to resize_size and keeps the aspect ratio, as
    CLIP/ConvNeXt processors do. A resize_size above size is then centre-cropped to size x size.
    ``processor`` takes all of these from a pretrained image processor (a hub name or a folder with
    preprocessor_config.json) when the preprocessing is fitted: a pretrained model sees its images
    framed as in its training. The resolved values are what the saved model records.
    """

    size: int = Field(32, gt=0, description="images come out size x size")
    mode: Literal["rgb", "grayscale"] = "rgb"
    mean: float | tuple[float, ...] = 0.5
    std: float | tuple[float, ...] = 0.5
    resize: Literal["squash", "shortest_edge"] = Field(
        "squash", description="squash: to resize_size x resize_size; shortest_edge: the shorter side to resize_size")
    resize_size: int | None = Field(None, gt=0, description="before the centre crop to size; null = size (no crop)")
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bilinear"
    processor: str | None = Field(None, description="take size/crop/resample/mean/std from this image processor")

    @model_validator(mode="after")
    def _per_channel(self) -> ImagePrep:
        for name in ("mean", "std"):
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values for mode '{self.mode}', got {len(values)}")
            if name == "std" and min(values) <= 0:
                raise ValueError("std must be positive")
        if self.resize_size is not None and self.resize_size < self.size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than the crop size {self.size}")
        return self

    @property
    def channels(self) -> int:
        return 3 if self.mode == "rgb" else 1


class AudioPrep(StrictModel):
    sample_rate: int = Field(16000, gt=0)
    resample: bool = Field(True, description="resample other rates; False makes a rate mismatch an error")
    n_mels: int = Field(40, gt=0)
    n_fft: int = Field(400, gt=0)
    hop_length: int = Field(160, gt=0)
    f_min: float = Field(0.0, ge=0)
    f_max: float | None = None
    max_seconds: float = Field(1.0, gt=0, description="longer clips are cropped")
    pad_mode: Literal["fixed", "longest"] = Field("fixed", description="pad to max_seconds or to the batch")
    features: Literal["log_mel", "waveform"] = Field(
        "log_mel", description="log-mel spectrogram, or the raw waveform for encoders that read samples (wav2vec2)")
    normalize_dbfs: float | None = Field(None, le=0, description="scale each clip to this RMS level (dBFS)")

    @property
    def max_frames(self) -> int:
        return int(self.max_seconds * self.sample_rate) // self.hop_length + 1


class VideoPrep(ImagePrep):
    """Frames of a video file (decoded with PyAV), each framed and normalised like an image (``ImagePrep``).

    ``fps: null`` (the default) takes ``frames`` frames spread uniformly over the clip (repeating
    frames of a clip that has fewer); ``fps: F`` takes one frame every 1/F s from the start, at
    most ``frames`` of them (a shorter clip gives fewer: the batch pads them and masks them out).
    Only the first ``max_seconds`` are decoded (null: the whole clip, which costs memory on long
    videos).
    """

    frames: int = Field(8, gt=0, description="frames per clip (uniform), or at most this many (fps)")
    fps: float | None = Field(None, gt=0, description="sample at this rate from the start; null = uniform")
    max_seconds: float | None = Field(10.0, gt=0, description="decode only the first max_seconds; null = all")


class FeaturesPrep(StrictModel):
    """Pre-extracted feature arrays (T, D) or (D,); D is learned from the training split per modality."""

    max_length: int = Field(512, gt=0, description="longer sequences keep their first max_length steps")


class ImageAugment(StrictModel):
    """Random horizontal flip and random resized crop of the preprocessed (C, size, size) image."""

    flip: float = Field(0.0, ge=0.0, le=1.0, description="probability of a horizontal flip")
    crop_scale: tuple[float, float] | None = Field(
        None, description="random resized crop: [min, max] fraction of the area kept, resized back to size")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect ratio range of the crop")

    @model_validator(mode="after")
    def _ranges(self) -> ImageAugment:
        for name, (low, high) in (("crop_scale", self.crop_scale or (0.5, 1.0)), ("crop_ratio", self.crop_ratio)):
            if not 0 < low <= high:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high, got [{low}, {high}]")
        if self.crop_scale is not None and self.crop_scale[1] > 1:
            raise ValueError(f"crop_scale is a fraction of the image's area: at most 1, got {self.crop_scale[1]}")
        return self


class AudioAugment(StrictModel):
    """SpecAugment masking of the log-mel: each mask is up to ``*_width`` frames / mel bins wide."""

    time_masks: int = Field(0, ge=0)
    time_width: int = Field(20, gt=0, description="a time mask covers 0..time_width frames (uniform)")
    freq_masks: int = Field(0, ge=0)
    freq_width: int = Field(8, gt=0, description="a frequency mask covers 0..freq_width mel bins (uniform)")


class TextAugment(StrictModel):
    """Word dropout: each token id is left out with this probability (never a tokenizer's special tokens)."""

    word_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class AugmentConfig(StrictModel):
    """Training-time augmentations per modality kind, off by default; only the train split sees them.

    Applied to each preprocessed sample as the loader reads it, drawn from (seed, epoch, sample index):
    random per epoch, reproducible per run. Not part of the preprocessing a model saves or a pack holds.
    """

    image: ImageAugment | None = None
    audio: AudioAugment | None = None
    text: TextAugment | None = None

    @property
    def active(self) -> bool:
        image = self.image is not None and (self.image.flip > 0 or self.image.crop_scale is not None)
        audio = self.audio is not None and (self.audio.time_masks > 0 or self.audio.freq_masks > 0)
        text = self.text is not None and self.text.word_dropout > 0
        return image or audio or text
