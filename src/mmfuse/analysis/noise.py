"""Robustness to noisy inputs: the main metric with one modality corrupted at increasing levels.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmfuse.analysis.subsets import CachedRunner, _metrics, _monitor
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.corrupt import get_corruption, list_corruptions, sample_rng
from mmfuse.data.dataset import Sample, SkipReport
from mmfuse.data.manifest import Record, read_manifest
from mmfuse.data.preprocess import RawInput
from mmfuse.model import MultimodalModel


def evaluation_records(model: MultimodalModel, manifest: str | Path, split: str | None = None) -> list[Record]:
    """The manifest's records (only the model's modalities, with targets), optionally one split."""
    used = {m: spec for m, spec in model.preprocessor.modalities.items() if m in model.modalities}
    records = read_manifest(Path(manifest), used, target_column=model.spec.target_column,
                            split_column="split" if split else None)
    if split:
        records = [r for r in records if (r.split or "").lower() == split.lower()]
        if not records:
            raise DataError(f"{manifest}: no rows with split '{split}'")
    return records


@dataclass
class DecodedSet:
    """Evaluation samples decoded once: raw inputs per modality (for corruption) and clean samples."""

    raw: list[dict[str, RawInput | None]]
    samples: list[Sample]
    report: SkipReport = field(default_factory=SkipReport)

    def __len__(self) -> int:
        return len(self.samples)


def decode_records(model: MultimodalModel, records: Sequence[Record],
                   on_error: Literal["raise", "skip"] = "raise") -> DecodedSet:
    """Decodes every record's fields for the model's modalities once; bad rows raise or are skipped.

    The clean samples equal what ``MultimodalDataset`` builds from the same records.
    """
    prep, task = model.preprocessor, model.task
    decoded = DecodedSet([], [])
    for record in records:
        try:
            raw: dict[str, RawInput | None] = {}
            for m in prep.modalities:
                value = record.fields.get(m) if m in model.modalities else None
                raw[m] = None if value is None else prep.decode(m, value)
            # Text can turn out empty (no tokens); decoded images and clips are always present.
            if all(v is None or (prep.kind(m) == "text" and prep.encode_decoded(m, v) is None)
                   for m, v in raw.items()):
                raise DataError(f"no modality present ({', '.join(model.modalities)} all empty)")
            try:
                target = task.encode_target(record.target)
            except ValueError as exc:
                raise DataError(str(exc)) from None
        except DataError as exc:
            message = f"{record.where}: {exc}"
            if on_error == "raise":
                raise DataError(message) from None
            decoded.report.skipped.append(message)
            continue
        decoded.raw.append(raw)
        decoded.samples.append(Sample(record.id, dict.fromkeys(prep.modalities), target))
    if not decoded.samples:
        raise DataError("no sample left to evaluate" + (" (every one was skipped)" if decoded.report.count else ""))
    for m in prep.modalities:  # one batched call per modality (audio clips share STFTs)
        has = [i for i, raw in enumerate(decoded.raw) if raw[m] is not None]
        encoded = prep.encode_decoded_many(m, [decoded.raw[i][m] for i in has])  # type: ignore[misc]
        for i, inputs in zip(has, encoded, strict=True):
            decoded.samples[i].inputs[m] = inputs
    return decoded


@dataclass
class NoiseCurve:
    """The main metric of one modality under one corruption, at each level."""

    modality: str
    corruption: str
    levels: list[float]
    values: list[float]

    @property
    def auc(self) -> float:
        """Trapezoid area under metric-vs-level over the levels (0..1): 1.0 = perfect at every level."""
        return sum((b - a) * (u + v) / 2 for a, b, u, v in
                   zip(self.levels, self.levels[1:], self.values, self.values[1:], strict=False))


@dataclass
class NoiseResult:
    metric: str
    mode: str
    seed: int
    curves: list[NoiseCurve]
    seconds: float = 0.0

    def curve(self, modality: str, corruption: str) -> NoiseCurve:
        for c in self.curves:
            if (c.modality, c.corruption) == (modality, corruption):
                return c
        raise KeyError(f"no curve for {modality}/{corruption}")


def noise_levels(levels: int | Sequence[float]) -> list[float]:
    """11 -> [0.0, 0.1, ..., 1.0]; an explicit list is checked to rise from 0 to at most 1."""
    if isinstance(levels, int):
        if levels < 2:
            raise ConfigError(f"need at least 2 noise levels (0 and 1), got {levels}")
        return [round(i / (levels - 1), 10) for i in range(levels)]
    values = [float(x) for x in levels]
    if not values or values[0] != 0.0 or any(b <= a for a, b in itertools.pairwise(values)) or values[-1] > 1:
        raise ConfigError(f"noise levels must rise from 0.0 to at most 1.0, got {values}")
    return values


def plan_corruptions(model: MultimodalModel, corruptions: Sequence[str] | None) -> list[tuple[str, str]]:
    """(modality, corruption) pairs: each used modality with every requested corruption of its kind."""
    kinds = {m: model.preprocessor.kind(m) for m in model.modalities}
    if corruptions is None:
        return [(m, c) for m in model.modalities for c in list_corruptions(kinds[m])]
    chosen = [get_corruption(name) for name in corruptions]
    for c in chosen:
        if c.kind not in kinds.values():
            raise ConfigError(f"corruption '{c.name}' is for {c.kind} but this model reads "
                              f"{', '.join(f'{m} ({k})' for m, k in kinds.items())}")
    return [(m, c.name) for m in model.modalities for c in chosen if c.kind == kinds[m]]


def noise_robustness(model: MultimodalModel, data: DecodedSet | Sequence[Record],
                     corruptions: Sequence[str] | None = None, levels: int | Sequence[float] = 11,
                     seed: int = 0, batch_size: int = 128, runner: CachedRunner | None = None) -> NoiseResult:
    """The main metric with each modality corrupted by each applicable corruption at each level.

    Level 0 is the identity for every corruption, so the clean metric is computed once and shared.
    """
    started = time.perf_counter()
    decoded = data if isinstance(data, DecodedSet) else decode_records(model, data)
    grid = noise_levels(levels)
    metric, mode = _monitor(model)
    plan = plan_corruptions(model, corruptions)
    runner = runner or CachedRunner(model, decoded.samples, batch_size)
    clean = _metrics(model.task, runner.outputs(model.modalities), runner.targets)[metric]
    curves = []
    for modality, name in plan:
        corruption = get_corruption(name)
        has = [i for i, raw in enumerate(decoded.raw) if raw.get(modality) is not None]
        values = []
        for level in grid:
            if level == 0:  # the identity for every corruption
                values.append(clean)
                continue
            noisy_raw = [corruption(decoded.raw[i][modality], level, sample_rng(seed, i)) for i in has]
            encoded = model.preprocessor.encode_decoded_many(modality, noisy_raw)
            noisy = list(decoded.samples)
            for i, inputs in zip(has, encoded, strict=True):
                sample = decoded.samples[i]
                noisy[i] = Sample(sample.id, {**sample.inputs, modality: inputs}, sample.target)
            outputs = runner.outputs_replacing(modality, noisy)
            values.append(_metrics(model.task, outputs, runner.targets)[metric])
        curves.append(NoiseCurve(modality, name, list(grid), values))
    return NoiseResult(metric, mode, seed, curves, time.perf_counter() - started)
