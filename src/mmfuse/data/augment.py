"""Training-time augmentations (``data.augment``): image flip / random resized crop, SpecAugment masks on
the log-mel, word dropout on token ids.

Why on the preprocessed sample tensors and not on the raw files: the same code then serves every
per-sample path (eager samples held in memory, ``data.mode: lazy``, a pack's shards), each epoch sees a
fresh draw although eager samples were decoded once, and the model's saved preprocessing is untouched.
The price for images is that the crop is taken from the resized (size x size) image rather than the
full-resolution original; for the small from-scratch encoders that is the usual CIFAR-style crop.

Every draw comes from a private generator seeded with (seed, epoch, sample index): reproducible for a
run, different per epoch, independent of DataLoader workers and of the order samples are read, and
never drawn from torch's global generator (that one belongs to the model's dropout). torchvision's
``RandomResizedCrop`` draws from the global generator, so its parameter sampling is redone here with
ours (the same algorithm) and torchvision's functional ops do the crop and flip.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mmfuse.config import AudioAugment, AugmentConfig, ImageAugment, TextAugment
from mmfuse.core.errors import ConfigError
from mmfuse.data.dataset import MultimodalDataset, Sample, SkipReport
from mmfuse.data.preprocess import ModalityInputs, Preprocessor

if TYPE_CHECKING:
    from mmfuse.data.lazy import BadSample


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator of its own for one (seed, epoch, sample): SeedSequence mixes the three into 64 bits."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform over low..high, both included."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's ``RandomResizedCrop.get_params``, drawn
    from ``generator`` (ten tries at a box of that area and aspect ratio, else the central crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _torchvision_functional() -> ModuleType:
    try:
        from torchvision.transforms.v2 import functional
    except ImportError:
        raise ConfigError("data.augment.image needs torchvision: pip install 'mmfuse[augment]'") from None
    return functional


def augment_image(pixels: Tensor, options: ImageAugment, generator: torch.Generator) -> Tensor:
    """(C, S, S) -> (C, S, S): a random resized crop (resized back to S x S, bilinear, antialiased), then
    a horizontal flip with probability ``flip``."""
    TF = _torchvision_functional()
    out = pixels
    if options.crop_scale is not None:
        size = [int(pixels.shape[-2]), int(pixels.shape[-1])]
        top, left, h, w = crop_box(size[0], size[1], options.crop_scale, options.crop_ratio, generator)
        out = TF.resized_crop(out, top, left, h, w, size, antialias=True)
    if options.flip > 0 and float(torch.rand((), generator=generator)) < options.flip:
        out = TF.horizontal_flip(out)
    return out


def spec_masks(length: int, count: int, width: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """``count`` (start, end) spans over ``length`` steps, each 0..min(width, length) long (SpecAugment)."""
    spans = []
    for _ in range(count):
        w = _randint(generator, 0, min(width, length))
        start = _randint(generator, 0, length - w)
        spans.append((start, start + w))
    return spans


def augment_mel(mel: Tensor, options: AudioAugment, generator: torch.Generator) -> Tensor:
    """(n_mels, T) -> a copy with time and frequency masks set to the clip's mean log-mel.

    The mean, not 0: our log-mel is not normalised, and 0 is the log of a loud sound (mel power 1),
    whereas the mean keeps a masked band at the clip's own level (as SpecAugment's 0 does after the
    per-utterance normalisation it assumes).
    """
    out = mel.clone()
    fill = float(mel.mean())
    for start, end in spec_masks(mel.shape[1], options.time_masks, options.time_width, generator):
        out[:, start:end] = fill
    for start, end in spec_masks(mel.shape[0], options.freq_masks, options.freq_width, generator):
        out[start:end, :] = fill
    return out


def word_dropout(ids: Tensor, rate: float, keep: frozenset[int], generator: torch.Generator) -> Tensor:
    """The ids with each one left out with probability ``rate``; ids in ``keep`` (a pretrained tokenizer's
    [CLS]/[SEP]...) always stay, and a sequence that would lose all of its other ids is left unchanged."""
    special = torch.tensor([int(i) in keep for i in ids.tolist()], dtype=torch.bool)
    drop = (torch.rand(len(ids), generator=generator) < rate) & ~special
    if not bool((~drop & ~special).any()):
        return ids
    return ids[~drop]


class Augmenter:
    """Applies ``data.augment`` to one preprocessed sample, per modality kind (see the module docstring)."""

    def __init__(self, options: AugmentConfig, preprocessor: Preprocessor, seed: int) -> None:
        self.options, self.seed = options, seed
        self.kinds = {m: preprocessor.kind(m) for m in preprocessor.modalities}
        self.special: dict[str, frozenset[int]] = {}
        for modality, tokenizer in preprocessor.tokenizers.items():
            hf = getattr(tokenizer, "hf", None)  # a pretrained tokenizer; the word tokenizer has none inside
            self.special[modality] = frozenset(int(i) for i in hf.all_special_ids) if hf is not None else frozenset()
        if options.image is not None and (options.image.crop_scale is not None or options.image.flip > 0):
            _torchvision_functional()  # without torchvision: say so now, not in a loader worker

    def __call__(self, sample: Sample, epoch: int, index: int) -> Sample:
        generator = sample_generator(self.seed, epoch, index)
        inputs: dict[str, ModalityInputs | None] = {}
        for modality in sorted(sample.inputs):
            value = sample.inputs[modality]
            inputs[modality] = None if value is None else self._modality(modality, value, generator)
        return replace(sample, inputs=inputs)  # a lazy sample keeps its index and crop note

    def _modality(self, modality: str, value: ModalityInputs, generator: torch.Generator) -> ModalityInputs:
        kind, options = self.kinds.get(modality), self.options
        if kind == "image" and options.image is not None and "pixels" in value:
            return {**value, "pixels": augment_image(value["pixels"], options.image, generator)}
        if kind == "audio" and options.audio is not None and "mel" in value:
            return {**value, "mel": augment_mel(value["mel"], options.audio, generator)}
        if kind == "text" and isinstance(options.text, TextAugment) and options.text.word_dropout > 0 \
                and "input_ids" in value:
            ids = word_dropout(value["input_ids"], options.text.word_dropout, self.special.get(modality, frozenset()),
                               generator)
            return {**value, "input_ids": ids}
        return value


class AugmentedDataset(MultimodalDataset):
    """The training split with ``Augmenter`` applied as samples are read.

    The loader (``mmfuse.engine.loader``) asks for ``[(epoch, i)]`` so each epoch draws anew even in
    persistent workers, which never see the main process's epoch counter; a plain ``[i]`` is epoch 0.
    """

    wants_epoch = True

    def __init__(self, base: MultimodalDataset, augmenter: Augmenter) -> None:
        # No super().__init__(): the base dataset holds (or reads) the samples.
        self.base, self.augmenter = base, augmenter

    @property
    def report(self) -> SkipReport:  # type: ignore[override]
        return self.base.report

    @report.setter
    def report(self, value: SkipReport) -> None:
        self.base.report = value

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | BadSample:  # type: ignore[override]
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.base[index]
        if not isinstance(item, Sample):  # a lazy split's bad sample travels on as it is
            return item
        return self.augmenter(item, epoch, index)

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        """The base split's samples, not augmented (augmentation happens as the loader reads them)."""
        return list(self.base.samples)

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        raise AttributeError("AugmentedDataset.samples is read-only: they are the base split's")


def with_augmentation(dataset: MultimodalDataset, options: AugmentConfig, preprocessor: Preprocessor,
                      seed: int) -> MultimodalDataset:
    """``dataset`` wrapped to augment its samples, or itself when no augmentation is on."""
    if not options.active:
        return dataset
    return AugmentedDataset(dataset, Augmenter(options, preprocessor, seed))
