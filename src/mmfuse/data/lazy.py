"""``data.mode: lazy``: a split whose samples are decoded from their raw files each time they are read.

The eager path (``MultimodalDataset``) preprocesses every sample once and holds the tensors in memory,
which a data set larger than memory cannot afford. ``LazyDataset`` holds the manifest records only and
runs the same ``build_sample`` (the same decoding, resizing, tokenising, log-mel) on a record when the
loader asks for it, in the ``data.num_workers`` DataLoader workers; nothing decoded is kept. What needs
the whole training split (vocabulary, labels, feature widths) is still fitted on it first, by
``fit_preprocessing``, which reads texts, labels and one array per features modality and decodes no
image or audio clip (audio normalisation, ``normalize_dbfs``, is per clip and needs no statistics).

Bad samples follow ``data.on_error``, but are found only when read, in a worker, which can neither
add to the main process's report nor raise an error the user can read (DataLoader re-raises it wrapped
in the worker's traceback). So ``[i]`` never raises for a bad sample: it returns a ``BadSample`` (row,
reason) in the sample's place; ``SkipAwareCollator`` (in the worker) collates the good samples into a
``LazyBatch`` that carries the bad ones, and ``absorb_skips`` (in the main process, as each batch
arrives) raises the first one's DataError naming file and row (``raise``) or adds them to the split's
``SkipReport`` once per sample however many epochs read it (``skip``). The report is complete once an
epoch has passed over the split, so a run's ``skipped.jsonl`` lists the same rows as eagerly; a batch
whose samples were all skipped is dropped. Audio clips cropped to ``data.audio.max_seconds`` travel
the same way (``LazySample.cropped_seconds``) into the preprocessor's ``CropTally``, once per clip, so a
run can print the one line the eager path prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from mmfuse.core.contracts import Batch, TargetCodec
from mmfuse.core.errors import DataError
from mmfuse.data.audio import CropTally
from mmfuse.data.dataset import Collator, MultimodalDataset, Sample, SkipReport, build_sample
from mmfuse.data.manifest import Record
from mmfuse.data.preprocess import Preprocessor


@dataclass
class BadSample:
    """A sample that failed to decode, in its place in the batch: its index, the error and its row."""

    index: int
    message: str
    row: dict[str, Any]
    fatal: bool
    """``on_error: raise``: the main process raises ``message`` instead of skipping the sample."""

    def error(self) -> DataError:
        return DataError(self.message)


@dataclass
class LazySample(Sample):
    """A sample read lazily: its index, and its audio clip's full length when it was cropped."""

    index: int = -1
    cropped_seconds: float | None = None


@dataclass
class LazyBatch(Batch):
    """A collated batch plus its bad samples (empty inputs when every sample was bad) and cropped clips."""

    bad: list[BadSample] = field(default_factory=list)
    cropped: list[tuple[int, float]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.present


class LazyDataset(MultimodalDataset):
    """The records of one split; ``[i]`` decodes and preprocesses record i now, or gives a ``BadSample``."""

    def __init__(self, records: list[Record], preprocessor: Preprocessor, task: TargetCodec | None,
                 on_error: Literal["raise", "skip"] = "raise") -> None:
        # No super().__init__(): that would preprocess every record now.
        self.records = list(records)
        self.preprocessor, self.task, self.on_error = preprocessor, task, on_error
        self.report = SkipReport()
        self._reported: set[int] = set()
        self._cropped: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> LazySample | BadSample:  # type: ignore[override]
        record = self.records[index]
        # This sample's crops alone: the preprocessor's tally counts each clip once, when it is reported.
        tally, self.preprocessor.crops = self.preprocessor.crops, CropTally()
        try:
            sample = build_sample(record, self.preprocessor, self.task)
        except DataError as exc:
            report = SkipReport()
            report.add(record, str(exc))
            return BadSample(index, report.skipped[0], report.rows[0], fatal=self.on_error == "raise")
        finally:
            cropped, self.preprocessor.crops = self.preprocessor.crops, tally
        seconds = cropped.longest_seconds if cropped.count else None
        return LazySample(sample.id, sample.inputs, sample.target, index=index, cropped_seconds=seconds)

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        """Every good sample, decoded now (slow and memory-hungry for big splits: loaders read ``[i]``)."""
        out: list[Sample] = []
        for i in range(len(self)):
            item = self[i]
            if isinstance(item, BadSample):
                self.note_skipped(item)
                continue
            if item.cropped_seconds is not None:
                self.note_cropped(item.index, item.cropped_seconds)
            out.append(item)
        return out

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        raise AttributeError("LazyDataset.samples is read-only: the samples are decoded when read")

    def note_cropped(self, index: int, seconds: float) -> None:
        """Counts a cropped clip in the preprocessor's tally, once however often it is read."""
        if index not in self._cropped:
            self._cropped.add(index)
            self.preprocessor.crops.add(seconds)

    def note_skipped(self, item: BadSample) -> None:
        """Adds a skipped sample to the report, once however often it is read (raises a fatal one)."""
        if item.fatal:
            raise item.error()
        if item.index not in self._reported:
            self._reported.add(item.index)
            self.report.skipped.append(item.message)
            self.report.rows.append(item.row)


class SkipAwareCollator:
    """Collates the good samples with ``collator`` and carries the bad ones (runs in the workers)."""

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __call__(self, items: list[Sample | BadSample]) -> LazyBatch:
        good = [s for s in items if isinstance(s, Sample)]
        bad = [s for s in items if isinstance(s, BadSample)]
        cropped = [(s.index, s.cropped_seconds) for s in good if isinstance(s, LazySample)
                   and s.cropped_seconds is not None]
        if not good:
            return LazyBatch(inputs={}, present={}, bad=bad)
        batch = self.collator(good)
        return LazyBatch(batch.inputs, batch.present, batch.target, batch.ids, bad, cropped)


def lazy_base(dataset: object) -> LazyDataset | None:
    """The ``LazyDataset`` under ``dataset`` (itself, or the split an augmenting wrapper reads), or None."""
    while not isinstance(dataset, LazyDataset):
        dataset = getattr(dataset, "base", None)
        if dataset is None:
            return None
    return dataset


def absorb_skips(dataset: LazyDataset, batch: Batch) -> Batch | None:
    """Raises the batch's first fatal bad sample, records skipped ones in ``dataset.report`` and cropped
    clips in its preprocessor's tally; the plain batch, or None when every sample of it was skipped."""
    if not isinstance(batch, LazyBatch):
        return batch
    for item in batch.bad:
        dataset.note_skipped(item)
    for index, seconds in batch.cropped:
        dataset.note_cropped(index, seconds)
    if batch.empty:
        return None
    return Batch(batch.inputs, batch.present, batch.target, batch.ids)


def without_skips(dataset: LazyDataset, batches: Iterable[Batch]) -> Iterator[Batch]:
    """The batches of a skip-aware loader as plain batches, their skipped samples reported."""
    for batch in batches:
        plain = absorb_skips(dataset, batch)
        if plain is not None:
            yield plain
