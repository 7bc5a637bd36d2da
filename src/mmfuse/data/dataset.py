"""A map-style dataset over preprocessed samples, and the collate function that pads them.

Samples are preprocessed once, when the dataset is built, so every epoch (and every model the
demo or a benchmark trains on the same data) reads tensors instead of decoding files again. Bad
samples raise a DataError naming the row, or with ``on_error='skip'`` are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from mmfuse.core.contracts import Batch, TargetCodec
from mmfuse.core.errors import DataError
from mmfuse.data.audio import SILENCE_LOG_MEL
from mmfuse.data.manifest import Record
from mmfuse.data.preprocess import ModalityInputs, Preprocessor


@dataclass
class Sample:
    id: str
    inputs: dict[str, ModalityInputs | None]
    target: Tensor | None = None


@dataclass
class SkipReport:
    """Samples left out under on_error='skip', each with the reason, so nothing vanishes silently.

    ``skipped`` holds one message per sample (as the error would have read); ``rows`` the same as
    records (file, row, id, reason) for the run folder's ``skipped.jsonl``.
    """

    skipped: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def add(self, record: Record, message: str) -> None:
        """Records that ``record`` was skipped; ``message`` names the row, the reason follows it."""
        self.skipped.append(message)
        prefix = f"{record.where}: "
        reason = message[len(prefix):] if message.startswith(prefix) else message
        self.rows.append({"file": record.source.name, "row": record.row, "id": record.id, "reason": reason})

    def entries(self) -> list[dict[str, Any]]:
        """One record per skipped sample; messages only where the rows were not kept (older caches)."""
        if len(self.rows) == len(self.skipped):
            return list(self.rows)
        return [{"reason": message} for message in self.skipped]


def build_sample(record: Record, preprocessor: Preprocessor, task: TargetCodec | None) -> Sample:
    """Preprocesses one record; any problem becomes a DataError that names the row."""
    try:
        inputs = preprocessor.encode_record(record)
    except DataError as exc:
        raise DataError(f"{record.where}: {exc}") from None
    if all(v is None for v in inputs.values()):
        raise DataError(f"{record.where}: no modality present ({', '.join(preprocessor.modalities)} all empty)")
    target = None
    if task is not None:
        try:
            target = task.encode_target(record.target)
        except ValueError as exc:
            raise DataError(f"{record.where}: {exc}") from None
    return Sample(record.id, inputs, target)


class SampleView(Sequence[Sample]):
    """The first ``length`` samples of something indexable, read only when asked (an index or a slice):
    a pack's split, or the first validation samples a check looks at, without holding them all."""

    def __init__(self, read: Callable[[int], Sample], length: int) -> None:
        self.read, self.length = read, length

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self.read(i) for i in range(*index.indices(self.length))]
        if not -self.length <= index < self.length:
            raise IndexError(index)
        return self.read(index % self.length)


class MultimodalDataset(Dataset[Sample]):
    def __init__(self, records: list[Record], preprocessor: Preprocessor, task: TargetCodec | None,
                 on_error: Literal["raise", "skip"] = "raise") -> None:
        self.samples: list[Sample] = []
        self.report = SkipReport()
        for record in records:
            try:
                self.samples.append(build_sample(record, preprocessor, task))
            except DataError as exc:
                if on_error == "raise":
                    raise
                self.report.add(record, str(exc))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


PAD_VALUES: dict[str, float] = {"mel": SILENCE_LOG_MEL}
"""The padding value of a collated input by name, zeros for any other: a log-mel frame past a clip's
end is silence. Whoever pads collated tensors further (``mmfuse.data.memory``) pads with these."""

CACHED_TOKENS, CACHED_MASK, CACHED_POOLED = "cached_tokens", "cached_mask", "cached_pooled"
"""Input names of a modality whose frozen encoder's outputs come from the feature cache: a sample
holds tokens (T, D), mask (T,) and pooled (D,); the model then skips that encoder."""


class Collator:
    """Stacks samples into a ``Batch``: pads text and feature sequences to the longest, audio to a
    fixed or batch length.

    An absent modality becomes zeros of the right shape with ``present=False``.
    """

    def __init__(self, preprocessor: Preprocessor, task: TargetCodec | None) -> None:
        self.preprocessor = preprocessor
        self.task = task

    def __call__(self, samples: list[Sample]) -> Batch:
        inputs, present = {}, {}
        for modality in self.preprocessor.modalities:
            values = [s.inputs.get(modality) for s in samples]
            present[modality] = torch.tensor([v is not None for v in values], dtype=torch.bool)
            inputs[modality] = self._collate_modality(modality, self.preprocessor.kind(modality), values)
        target = None
        if self.task is not None and samples and samples[0].target is not None:
            target = self.task.collate_targets([s.target for s in samples if s.target is not None])
        return Batch(inputs=inputs, present=present, target=target, ids=[s.id for s in samples])

    def collate_modality(self, modality: str, values: list[ModalityInputs | None]) -> dict[str, Tensor]:
        """The collated inputs of one modality (what its encoder reads), e.g. to precompute features."""
        return self._collate_modality(modality, self.preprocessor.kind(modality), values)

    def _collate_modality(self, modality: str, kind: str, values: list[ModalityInputs | None]) -> dict[str, Tensor]:
        if any(v is not None and CACHED_POOLED in v for v in values):
            return self._collate_cached(values)
        if kind == "text":
            return self._collate_text(values)
        if kind == "image":
            prep = self.preprocessor.image
            blank = torch.zeros(prep.channels, prep.size, prep.size)
            return {"pixels": torch.stack([blank if v is None else v["pixels"] for v in values])}
        if kind == "features":
            return self._collate_features(values, self.preprocessor.feature_dims.get(modality, 0))
        if kind == "video":
            return self._collate_video(values)
        return self._collate_audio(values)

    def _collate_video(self, values: list[ModalityInputs | None]) -> dict[str, Tensor]:
        """pixels (B, frames, C, H, W) and frame_mask (B, frames): clips with fewer frames (``fps``
        sampling of a short clip) are zero-padded and masked; absent rows are zeros, all masked."""
        prep = self.preprocessor.video
        clips = [torch.zeros(0, prep.channels, prep.size, prep.size) if v is None else v["pixels"] for v in values]
        frames = max(prep.frames, *(len(c) for c in clips))
        out = torch.zeros(len(clips), frames, prep.channels, prep.size, prep.size)
        mask = torch.zeros(len(clips), frames, dtype=torch.bool)
        for i, clip in enumerate(clips):
            out[i, : len(clip)] = clip
            mask[i, : len(clip)] = True
        return {"pixels": out, "frame_mask": mask}

    @staticmethod
    def _collate_cached(values: list[ModalityInputs | None]) -> dict[str, Tensor]:
        """Cached encoder outputs (see ``mmfuse.engine.feature_cache``): tokens zero-padded to the longest.

        ``pad_sequence`` and one indexed copy per tensor, not a Python loop of row copies: with the
        encoders gone, collating is a large share of what a cached step costs.
        """
        first = next(v for v in values if v is not None)
        dim, dtype = first[CACHED_POOLED].shape[-1], first[CACHED_POOLED].dtype
        rows = [i for i, v in enumerate(values) if v is not None]
        present = [values[i] for i in rows]
        tokens_p = pad_sequence([v[CACHED_TOKENS] for v in present], batch_first=True)  # type: ignore[index]
        mask_p = pad_sequence([v[CACHED_MASK] for v in present], batch_first=True)  # type: ignore[index]
        pooled_p = torch.stack([v[CACHED_POOLED] for v in present])  # type: ignore[index]
        if len(rows) == len(values):
            return {CACHED_TOKENS: tokens_p, CACHED_MASK: mask_p, CACHED_POOLED: pooled_p}
        index = torch.tensor(rows)
        tokens = torch.zeros(len(values), tokens_p.shape[1], dim, dtype=dtype)
        mask = torch.zeros(len(values), tokens_p.shape[1], dtype=torch.bool)
        pooled = torch.zeros(len(values), dim, dtype=dtype)
        tokens[index], mask[index], pooled[index] = tokens_p, mask_p, pooled_p
        return {CACHED_TOKENS: tokens, CACHED_MASK: mask, CACHED_POOLED: pooled}

    @staticmethod
    def _collate_text(values: list[ModalityInputs | None]) -> dict[str, Tensor]:
        seqs = [torch.zeros(0, dtype=torch.long) if v is None else v["input_ids"] for v in values]
        length = max(1, *(len(s) for s in seqs))
        ids = torch.zeros(len(seqs), length, dtype=torch.long)
        mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = True
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def _collate_features(values: list[ModalityInputs | None], dim: int) -> dict[str, Tensor]:
        """Pads (T_i, D) feature sequences with zeros to the longest T; ``mask`` marks real steps."""
        seqs = [torch.zeros(0, dim) if v is None else v["values"] for v in values]
        length = max(1, *(len(s) for s in seqs))
        out = torch.zeros(len(seqs), length, dim)
        mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, seq in enumerate(seqs):
            out[i, : len(seq)] = seq
            mask[i, : len(seq)] = True
        return {"values": out, "mask": mask}

    def _collate_audio(self, values: list[ModalityInputs | None]) -> dict[str, Tensor]:
        """log-mel (B, n_mels, frames): a clip shorter than ``frames`` is padded with what silence gives.

        Padding with 0 would append the log-mel of a loud broadband sound (mel power 1) to every
        short clip; ``SILENCE_LOG_MEL`` makes a padded clip look like the clip followed by silence,
        bit for bit. Absent rows hold zeros, as for every modality.
        """
        prep = self.preprocessor.audio
        if prep.features == "waveform":
            return self._collate_waveforms(values)
        mels = [torch.zeros(prep.n_mels, 0) if v is None else v["mel"] for v in values]
        frames = prep.max_frames if prep.pad_mode == "fixed" else max(1, *(m.shape[1] for m in mels))
        out = torch.stack([
            torch.zeros(prep.n_mels, frames) if v is None
            else F.pad(m[:, :frames], (0, frames - min(frames, m.shape[1])), value=PAD_VALUES["mel"])
            for v, m in zip(values, mels, strict=True)
        ])
        mask = torch.zeros(len(mels), frames, dtype=torch.bool)
        for i, mel in enumerate(mels):
            mask[i, : min(frames, mel.shape[1])] = True
        return {"mel": out, "frame_mask": mask}

    def _collate_waveforms(self, values: list[ModalityInputs | None]) -> dict[str, Tensor]:
        """Raw samples (``audio.features: waveform``) zero-padded to max_seconds or the longest clip."""
        prep = self.preprocessor.audio
        waves = [torch.zeros(0) if v is None else v["waveform"] for v in values]
        fixed = int(prep.max_seconds * prep.sample_rate)
        length = fixed if prep.pad_mode == "fixed" else max(1, *(len(w) for w in waves))
        out = torch.zeros(len(waves), length)
        mask = torch.zeros(len(waves), length, dtype=torch.bool)
        for i, wave in enumerate(waves):
            n = min(length, len(wave))
            out[i, :n] = wave[:n]
            mask[i, :n] = True
        return {"waveform": out, "sample_mask": mask}
