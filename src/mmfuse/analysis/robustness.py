"""Robustness of a trained model: missing modalities, modality importance, noisy inputs.

Three studies, each a function with a typed result, and ``run_robustness`` for all three:

- ``missing_subsets``: every task metric for each of the 2^M - 1 non-empty subsets of the model's M
  modalities present (the others hidden from every sample, as ``evaluate(absent=...)`` does), plus
  the empty set: everything hidden, the model's chance-level baseline.
- ``shapley_importance``: per modality, the ablation delta ``v(all) - v(all without m)`` and the
  exact Shapley value over modalities of the game ``v(S)`` = the main metric with only S present,
  overall and per class (per-class accuracy = recall of that class). For a metric where lower is
  better (regression MAE) ``v`` is the negated metric, so a positive importance always means the
  modality helps, in the metric's units. By efficiency the Shapley values sum to v(all) - v(empty).
- ``noise_robustness``: the main metric with one modality corrupted at levels 0.0, 0.1, ..., 1.0
  by each corruption of ``mmfuse.data.corrupt`` that fits its kind, applied to the raw input (the
  decoded image / waveform / text) before the model's own preprocessing; and the area under each
  metric-vs-level curve (trapezoid over [0, 1]: 1.0 = perfect accuracy at every level).
  Files are decoded once per sample and reused across corruptions and levels; corruption of sample
  i uses ``sample_rng(seed, i)``, so results are reproducible.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.table import Table
from torch import Tensor

from mmfuse.core.contracts import Batch, Features
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.corrupt import get_corruption, list_corruptions, sample_rng
from mmfuse.data.dataset import Collator, MultimodalDataset, Sample, SkipReport
from mmfuse.data.manifest import Record, read_manifest
from mmfuse.data.preprocess import RawInput
from mmfuse.engine.evaluate import hide_modalities, model_device
from mmfuse.model import MultimodalModel
from mmfuse.tasks.base import Task

NONE_NAME = "none"
"""The name of the empty subset (every modality hidden)."""


# ------------------------------------------------------------------------------------- subsets


def subset_name(present: Iterable[str]) -> str:
    """'audio+image+text' for a set of modalities, sorted; 'none' for the empty set."""
    names = sorted(present)
    return "+".join(names) if names else NONE_NAME


def enumerate_subsets(modalities: Iterable[str]) -> list[tuple[str, ...]]:
    """The 2^M - 1 non-empty subsets, each sorted, largest first, then alphabetically."""
    names = sorted(set(modalities))
    subsets = [c for k in range(len(names), 0, -1) for c in itertools.combinations(names, k)]
    return sorted(subsets, key=lambda s: (-len(s), s))


@dataclass
class SubsetScore:
    """Metrics with only ``present`` shown to the model; ``per_class`` is the recall of each class."""

    present: tuple[str, ...]
    metrics: dict[str, float]
    per_class: dict[str, float] | None = None

    @property
    def name(self) -> str:
        return subset_name(self.present)


@dataclass
class MissingSubsetsResult:
    """Every task metric for each non-empty subset of present modalities (and for none)."""

    modalities: list[str]
    metric: str
    mode: str
    subsets: list[SubsetScore]
    empty: SubsetScore
    classes: list[str] | None = None

    def score(self, present: Iterable[str]) -> SubsetScore:
        key = tuple(sorted(present))
        if not key:
            return self.empty
        for s in self.subsets:
            if s.present == key:
                return s
        raise KeyError(f"no subset {subset_name(key)}; modalities: {', '.join(self.modalities)}")

    def value(self, present: Iterable[str], metric: str | None = None) -> float:
        return self.score(present).metrics[metric or self.metric]

    @property
    def all(self) -> SubsetScore:
        return self.score(self.modalities)


# ------------------------------------------------------------------------------------ scoring


def _as_samples(data: MultimodalDataset | Sequence[Sample]) -> Sequence[Sample]:
    samples = data.samples if isinstance(data, MultimodalDataset) else data
    if len(samples) == 0:
        raise DataError("cannot evaluate robustness on an empty dataset")
    if any(s.target is None for s in samples):
        raise DataError("robustness evaluation needs a target for every sample")
    return samples


@contextlib.contextmanager
def _inference(model: MultimodalModel) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class CachedRunner:
    """Runs ``model`` on fixed samples many times, each encoder's features computed once.

    A modality's features do not depend on the other modalities, and hiding a modality from every
    sample gives the same all-absent features ``model.encode`` makes for it, so each study only
    re-runs what changes: fusion and head for a subset, one encoder for a corrupted modality.
    """

    def __init__(self, model: MultimodalModel, samples: Sequence[Sample], batch_size: int = 128) -> None:
        self.model, self.batch_size = model, batch_size
        self.collate = Collator(model.preprocessor, model.task)
        self.device = model_device(model)
        self.clean: list[dict[str, Features]] = []
        self.hidden: list[dict[str, Features]] = []
        targets = []
        with _inference(model):  # only features and targets are kept, not the input tensors
            for start in range(0, len(samples), batch_size):
                batch = self._collate(samples[start:start + batch_size])
                assert batch.target is not None
                self.clean.append(model.encode(batch))
                self.hidden.append(model.encode(hide_modalities(batch, model.modalities)))
                targets.append(batch.target.cpu())
        self.targets = torch.cat(targets)

    def _collate(self, samples: Sequence[Sample]) -> Batch:
        return self.collate(list(samples)).to(self.device)

    def _head(self, features: dict[str, Features]) -> Tensor:
        assert self.model.fusion is not None, "robustness studies need a model with a fusion"
        return self.model.head(self.model.fusion(features)).float().cpu()

    def outputs(self, present: Collection[str]) -> Tensor:
        """Outputs with only ``present`` modalities shown (as ``evaluate(absent=the others)``)."""
        with _inference(self.model):
            return torch.cat([
                self._head({m: clean[m] if m in present else hidden[m] for m in self.model.modalities})
                for clean, hidden in zip(self.clean, self.hidden, strict=True)
            ])

    def outputs_replacing(self, modality: str, samples: Sequence[Sample]) -> Tensor:
        """Outputs with ``modality``'s inputs taken from ``samples`` (same order) and the rest clean."""
        others = [m for m in self.model.modalities if m != modality]
        result = []
        with _inference(self.model):
            for k, clean in enumerate(self.clean):
                batch = self._collate(samples[k * self.batch_size:(k + 1) * self.batch_size])
                replaced = self.model.encode(hide_modalities(batch, others))[modality]
                result.append(self._head({**clean, modality: replaced}))
        return torch.cat(result)


def _metrics(task: Task, outputs: Tensor, targets: Tensor) -> dict[str, float]:
    metrics = task.metrics()
    metrics.update(*task.metric_inputs(outputs, targets))
    return {name: float(value) for name, value in metrics.compute().items()}


def _class_names(task: Task, targets: Tensor) -> list[str] | None:
    """Labels that occur in ``targets`` (classes, or multi-label positives); None for regression."""
    labels: list[str] | None = getattr(task, "labels", None)
    if not labels:
        return None
    if targets.ndim == 1 and not targets.is_floating_point():
        seen = set(targets.tolist())
        return [name for i, name in enumerate(labels) if i in seen]
    if targets.ndim == 2 and targets.shape[1] == len(labels):
        positives = targets.sum(dim=0) > 0
        return [name for i, name in enumerate(labels) if bool(positives[i])]
    return None


def _per_class_recall(task: Task, outputs: Tensor, targets: Tensor,
                      classes: list[str] | None) -> dict[str, float] | None:
    """Recall of each class: the accuracy on the samples of that class (per label for multi-label)."""
    if classes is None:
        return None
    labels: list[str] = task.labels  # type: ignore[attr-defined]
    result = {}
    if targets.ndim == 1:
        predicted = outputs.argmax(dim=-1)
        for name in classes:
            mine = targets == labels.index(name)
            result[name] = float((predicted[mine] == targets[mine]).float().mean())
    else:
        threshold = float(getattr(task, "threshold", 0.5))
        predicted = outputs.sigmoid() >= threshold
        for name in classes:
            i = labels.index(name)
            mine = targets[:, i] > 0.5
            result[name] = float(predicted[mine, i].float().mean())
    return result


def _monitor(model: MultimodalModel) -> tuple[str, str]:
    metric, mode = model.task.monitor
    if mode not in ("max", "min"):
        raise ConfigError(f"task '{model.task.name}' monitors '{metric}' with unknown mode '{mode}'")
    return metric, mode


def missing_subsets(model: MultimodalModel, data: MultimodalDataset | Sequence[Sample] | CachedRunner,
                    batch_size: int = 128) -> MissingSubsetsResult:
    """Every task metric with each non-empty subset of the model's modalities present, and with none."""
    runner = data if isinstance(data, CachedRunner) else CachedRunner(model, _as_samples(data), batch_size)
    metric, mode = _monitor(model)
    modalities = list(model.modalities)
    targets = runner.targets
    classes = _class_names(model.task, targets)
    scores: list[SubsetScore] = []
    for present in [*enumerate_subsets(modalities), ()]:
        outputs = runner.outputs(present)
        scores.append(SubsetScore(present, _metrics(model.task, outputs, targets),
                                  _per_class_recall(model.task, outputs, targets, classes)))
    return MissingSubsetsResult(modalities, metric, mode, scores[:-1], scores[-1], classes)


# ----------------------------------------------------------------------------------- importance


def shapley_values(players: Sequence[str], value: Callable[[frozenset[str]], float]) -> dict[str, float]:
    """Exact Shapley values of the cooperative game ``value`` (called once per subset of ``players``).

    phi_i = sum over S not containing i of |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S)).
    """
    names = sorted(set(players))
    n = len(names)
    cache = {frozenset(c): float(value(frozenset(c)))
             for k in range(n + 1) for c in itertools.combinations(names, k)}
    result = {}
    for player in names:
        others = [p for p in names if p != player]
        total = 0.0
        for k in range(n):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, k):
                s = frozenset(coalition)
                total += weight * (cache[s | {player}] - cache[s])
        result[player] = total
    return result


@dataclass
class ImportanceResult:
    """Ablation deltas and Shapley values per modality; positive = the modality helps.

    In metric units, with the sign flipped for a metric where lower is better (``mode == 'min'``).
    ``per_class_*`` map class -> modality -> value, on that class's recall.
    """

    metric: str
    mode: str
    modalities: list[str]
    full: float
    empty: float
    ablation: dict[str, float]
    shapley: dict[str, float]
    classes: list[str] | None = None
    per_class_ablation: dict[str, dict[str, float]] | None = None
    per_class_shapley: dict[str, dict[str, float]] | None = None


def shapley_importance(subsets: MissingSubsetsResult) -> ImportanceResult:
    """Ablation deltas and exact Shapley values over modalities from the subset metrics.

    The value of the empty coalition is the metric with every modality hidden (chance level).
    """
    sign = 1.0 if subsets.mode == "max" else -1.0
    modalities = subsets.modalities
    everything = frozenset(modalities)

    def game(value_of: Callable[[SubsetScore], float]) -> tuple[dict[str, float], dict[str, float]]:
        def v(s: frozenset[str]) -> float:
            return value_of(subsets.score(s))

        ablation = {m: v(everything) - v(everything - {m}) for m in modalities}
        return ablation, shapley_values(modalities, v)

    ablation, shapley = game(lambda s: sign * s.metrics[subsets.metric])
    per_ablation = per_shapley = None
    if subsets.classes is not None:
        per_ablation, per_shapley = {}, {}
        for c in subsets.classes:
            per_ablation[c], per_shapley[c] = game(lambda s, c=c: (s.per_class or {})[c])  # type: ignore[misc]
    return ImportanceResult(
        metric=subsets.metric, mode=subsets.mode, modalities=list(modalities),
        full=subsets.all.metrics[subsets.metric], empty=subsets.empty.metrics[subsets.metric],
        ablation=ablation, shapley=shapley, classes=subsets.classes,
        per_class_ablation=per_ablation, per_class_shapley=per_shapley,
    )


# ---------------------------------------------------------------------------------------- noise


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


# ----------------------------------------------------------------------------------------- all


@dataclass
class RobustnessReport:
    metrics: dict[str, float]
    subsets: MissingSubsetsResult
    importance: ImportanceResult
    noise: NoiseResult
    samples: int
    seconds: dict[str, float]
    files: dict[str, Path] = field(default_factory=dict)
    skipped: SkipReport = field(default_factory=SkipReport)


def run_robustness(model: MultimodalModel, records: Sequence[Record], out: str | Path | None = None,
                   seed: int = 0, levels: int | Sequence[float] = 11, corruptions: Sequence[str] | None = None,
                   batch_size: int = 128, on_error: Literal["raise", "skip"] = "raise") -> RobustnessReport:
    """Missing-modality subsets, modality importance and noise robustness; writes CSVs/PNGs to ``out``."""
    grid = noise_levels(levels)  # check the arguments before the slow part
    plan_corruptions(model, corruptions)
    timer = time.perf_counter()
    decoded = decode_records(model, records, on_error)
    seconds = {"decode": time.perf_counter() - timer}
    timer = time.perf_counter()
    runner = CachedRunner(model, decoded.samples, batch_size)
    subsets = missing_subsets(model, runner)
    importance = shapley_importance(subsets)
    seconds["subsets"] = time.perf_counter() - timer
    noise = noise_robustness(model, decoded, corruptions, grid, seed, batch_size, runner)
    seconds["noise"] = noise.seconds
    report = RobustnessReport(subsets.all.metrics, subsets, importance, noise, len(decoded), seconds,
                              skipped=decoded.report)
    if out is not None:
        timer = time.perf_counter()
        report.files = write_report(report, Path(out))
        seconds["write"] = time.perf_counter() - timer
    seconds["total"] = sum(seconds.values())
    return report


# -------------------------------------------------------------------------------------- output


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def write_report(report: RobustnessReport, out: Path) -> dict[str, Path]:
    """missing_subsets.csv, importance.csv, noise.csv, noise_auc.csv, noise_curves.png, importance.png."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("missing_subsets.csv", "importance.csv", "noise.csv", "noise_auc.csv",
                                           "noise_curves.png", "importance.png")}
    subsets, importance, noise = report.subsets, report.importance, report.noise
    names = list(subsets.all.metrics)
    rows: list[list[Any]] = [[s.name, len(s.present), *(_fmt(s.metrics[n]) for n in names)]
                             for s in [*subsets.subsets, subsets.empty]]
    _write_csv(files["missing_subsets.csv"], ["present", "n_present", *names], rows)
    rows = [[importance.metric, "", m, _fmt(importance.ablation[m]), _fmt(importance.shapley[m])]
            for m in importance.modalities]
    for c in importance.classes or []:
        assert importance.per_class_ablation is not None and importance.per_class_shapley is not None
        rows += [["recall", c, m, _fmt(importance.per_class_ablation[c][m]), _fmt(importance.per_class_shapley[c][m])]
                 for m in importance.modalities]
    _write_csv(files["importance.csv"], ["metric", "class", "modality", "ablation_delta", "shapley"], rows)
    rows = [[c.modality, c.corruption, f"{level:g}", noise.metric, _fmt(v)]
            for c in noise.curves for level, v in zip(c.levels, c.values, strict=True)]
    _write_csv(files["noise.csv"], ["modality", "corruption", "level", "metric", "value"], rows)
    rows = [[c.modality, c.corruption, noise.metric, _fmt(c.values[0]), _fmt(c.values[-1]), _fmt(c.auc)]
            for c in noise.curves]
    _write_csv(files["noise_auc.csv"], ["modality", "corruption", "metric", "clean", "at_max_level", "auc"], rows)
    plot_noise_curves(report, files["noise_curves.png"])
    plot_importance(importance, files["importance.png"])
    return files


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_noise_curves(report: RobustnessReport, path: Path) -> None:
    """One subplot per modality, one line per corruption; dashed: the modality hidden; dotted: all hidden."""
    plt = _pyplot()
    noise, subsets = report.noise, report.subsets
    modalities = [m for m in subsets.modalities if any(c.modality == m for c in noise.curves)]
    fig, axes = plt.subplots(1, max(1, len(modalities)), figsize=(4.2 * max(1, len(modalities)), 3.6),
                             sharey=True, squeeze=False)
    for ax, modality in zip(axes[0], modalities, strict=False):
        for c in noise.curves:
            if c.modality == modality:
                ax.plot(c.levels, c.values, marker="o", markersize=3, label=f"{c.corruption} (AUC {c.auc:.2f})")
        others = [m for m in subsets.modalities if m != modality]
        ax.axhline(subsets.value(others), linestyle="--", color="grey", linewidth=1, label=f"{modality} hidden")
        ax.axhline(subsets.empty.metrics[noise.metric], linestyle=":", color="black", linewidth=1, label="all hidden")
        ax.set_title(modality)
        ax.set_xlabel("corruption level")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    better = "higher" if noise.mode == "max" else "lower"
    axes[0][0].set_ylabel(f"{noise.metric} ({better} is better)")
    fig.suptitle(f"{noise.metric} vs. input corruption ({report.samples} samples, seed {noise.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_importance(importance: ImportanceResult, path: Path) -> None:
    """Ablation delta and Shapley value per modality; and per-class Shapley values when there are classes."""
    plt = _pyplot()
    per_class = importance.per_class_shapley
    fig, axes = plt.subplots(1, 2 if per_class else 1, squeeze=False,
                             figsize=(11 if per_class else 5.5, 3.8),
                             gridspec_kw={"width_ratios": [1, 2]} if per_class else None)
    ax = axes[0][0]
    mods = importance.modalities
    x = list(range(len(mods)))
    width = 0.38
    bars = ax.bar([i - width / 2 for i in x], [importance.ablation[m] for m in mods], width, label="ablation delta")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    bars = ax.bar([i + width / 2 for i in x], [importance.shapley[m] for m in mods], width, label="Shapley")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, mods)
    ax.margins(y=0.2)
    ax.axhline(0, color="black", linewidth=0.8)
    sign = "" if importance.mode == "max" else "-"
    ax.set_ylabel(f"importance ({sign}{importance.metric})")
    ax.set_title(f"overall ({importance.metric}: all {importance.full:.2f}, none {importance.empty:.2f})")
    ax.legend(fontsize=8)
    if per_class:
        ax = axes[0][1]
        classes = list(per_class)
        width = 0.8 / max(1, len(mods))
        for j, m in enumerate(mods):
            ax.bar([i + (j - (len(mods) - 1) / 2) * width for i in range(len(classes))],
                   [per_class[c][m] for c in classes], width, label=m)
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("Shapley value (recall)")
        ax.set_title("per class")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_tables(report: RobustnessReport) -> list[Table]:
    """Rich tables: missing subsets, importance (overall and per class), noise AUCs."""
    subsets, importance, noise = report.subsets, report.importance, report.noise
    better = "higher is better" if subsets.mode == "max" else "lower is better"
    names = list(subsets.all.metrics)
    names.remove(subsets.metric)
    names.insert(0, subsets.metric)
    table = Table(title=f"missing modalities: metrics with only these present ({subsets.metric}: {better})")
    table.add_column("present")
    for n in names:
        table.add_column(n, justify="right")
    for s in [*subsets.subsets, subsets.empty]:
        table.add_row(s.name if s.present else "none (all hidden)", *(_fmt(s.metrics[n]) for n in names))
    tables = [table]

    unit = importance.metric if importance.mode == "max" else f"-{importance.metric}"
    table = Table(title=f"modality importance in {unit} (all {importance.full:.4f}, none {importance.empty:.4f}); "
                        "positive = helps")
    for column in ("modality", "ablation delta", "Shapley"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for m in importance.modalities:
        table.add_row(m, _fmt(importance.ablation[m]), _fmt(importance.shapley[m]))
    table.add_row("sum", "", _fmt(sum(importance.shapley.values())))
    tables.append(table)
    if importance.per_class_shapley:
        table = Table(title="Shapley value per class (on the class's recall)")
        table.add_column("class")
        for m in importance.modalities:
            table.add_column(m, justify="right")
        for c, values in importance.per_class_shapley.items():
            table.add_row(c, *(_fmt(values[m]) for m in importance.modalities))
        tables.append(table)

    table = Table(title=f"noise robustness: {noise.metric} vs. corruption level 0..1 ({better}; "
                        f"AUC = trapezoid area over levels, seed {noise.seed})")
    top = f"level {noise.curves[0].levels[-1]:g}" if noise.curves else "max level"
    for column in ("modality", "corruption", "clean", top, "AUC"):
        table.add_column(column, justify="left" if column in ("modality", "corruption") else "right")
    for curve in noise.curves:
        table.add_row(curve.modality, curve.corruption, _fmt(curve.values[0]), _fmt(curve.values[-1]),
                      _fmt(curve.auc))
    tables.append(table)
    return tables
