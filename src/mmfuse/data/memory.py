"""The fast in-memory path: a split as stacked tensors, batches sliced from them, no per-sample work.

``data.in_memory: true`` makes ``prepare_data`` build each split once into fixed-shape tensors
(every input tensor of every modality, ``present`` flags, targets), store them as ``.npy`` files in
a cache folder keyed by the records, the SHA-256 of every referenced file's bytes, the fitted
preprocessing, the versions of mmfuse and of the decoding libraries and the identity of the
preprocessing code (``cache_key``), and memory-map them on later runs. A training batch is then
one index gather per tensor (``tensor[indices]``): no Python loop over samples, no collate, no
DataLoader workers. When the trainer runs on a GPU the tensors are moved there once, so batches
never cross the bus.

The tensors are what ``Collator`` makes of the whole split, padded to the longest sample of the
split instead of the batch (text, feature sequences, ``pad_mode: longest`` audio); encoders mask
padding, so the model sees the same batch either way. ``ArrayDataset`` is also a map-style dataset
of ``Sample``s, so evaluation, robustness and prediction code written for ``MultimodalDataset``
keeps working.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mmfuse.core.atomic import staged_folder
from mmfuse.core.cache_home import cache_dir
from mmfuse.core.contracts import Batch, TargetCodec
from mmfuse.core.errors import DataError
from mmfuse.core.identity import code_identity, file_digest, library_versions
from mmfuse.data.arrays import parse_reference
from mmfuse.data.dataset import PAD_VALUES, Collator, MultimodalDataset, Sample, SkipReport
from mmfuse.data.manifest import Record
from mmfuse.data.preprocess import Preprocessor

CACHE_VERSION = "arrays-v2"
_BUILD_CHUNK = 512


def cache_root(configured: Path | None = None) -> Path:
    """``data.in_memory_cache``, else ``$MMFUSE_CACHE/arrays``, else ``~/.cache/mmfuse/arrays``."""
    if configured is not None:
        return Path(configured).expanduser()
    return cache_dir("arrays")


def _pad_to(tensor: Tensor, shape: tuple[int, ...], value: float = 0.0) -> Tensor:
    pads: list[int] = []
    for have, want in zip(reversed(tensor.shape), reversed(shape), strict=True):
        pads += [0, want - have]
    return F.pad(tensor, pads, value=value) if any(pads) else tensor


class ArrayDataset(MultimodalDataset):
    """One split as tensors: ``inputs[modality][name]`` (N, ...), ``present[modality]`` (N,), ``target``.

    A ``MultimodalDataset`` (same ``len``, ``[i]``, ``samples``, ``report``) whose samples are views
    of the tensors, so code written for per-sample datasets accepts it unchanged.
    """

    def __init__(self, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor], target: Tensor | None,
                 ids: list[str], report: SkipReport | None = None) -> None:
        # No super().__init__(): there are no records to preprocess, the tensors are the data.
        self.inputs, self.present, self.target, self.ids = inputs, present, target, ids
        self.report = report or SkipReport()

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: Tensor) -> Batch:
        """The rows ``index`` (a 1-D long tensor) as a ``Batch``: one gather per tensor."""
        index = index.to(next(iter(self.present.values())).device)
        return Batch(
            inputs={m: {k: v[index] for k, v in d.items()} for m, d in self.inputs.items()},
            present={m: p[index] for m, p in self.present.items()},
            target=None if self.target is None else self.target[index],
            ids=[self.ids[i] for i in index.tolist()],
        )

    def to(self, device: torch.device | str) -> ArrayDataset:
        """Moves every tensor (e.g. to the GPU once, before training)."""
        moved = Batch(self.inputs, self.present, self.target).to(device)
        self.inputs, self.present, self.target = moved.inputs, moved.present, moved.target
        return self

    def __getitem__(self, index: int) -> Sample:
        """One sample, trimmed of split-level padding, as ``MultimodalDataset`` would hold it."""
        inputs: dict[str, dict[str, Tensor] | None] = {}
        for modality, tensors in self.inputs.items():
            if not bool(self.present[modality][index]):
                inputs[modality] = None
                continue
            row = {k: v[index].cpu() for k, v in tensors.items()}
            inputs[modality] = _trim(row)
        target = None if self.target is None else self.target[index].cpu()
        return Sample(self.ids[index], inputs, target)

    @property
    def samples(self) -> list[Sample]:  # type: ignore[override]
        """Every sample as its own tensors (slow for big splits: batches use ``batch``)."""
        return [self[i] for i in range(len(self))]

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        raise AttributeError("ArrayDataset.samples is read-only: it is derived from the tensors")


def _trim(row: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drops padding using the modality's mask (text attention_mask, audio frame_mask, features mask)."""
    if "input_ids" in row:
        n = int(row["attention_mask"].sum())
        return {"input_ids": row["input_ids"][:n]}
    if "mel" in row:
        n = int(row["frame_mask"].sum())
        return {"mel": row["mel"][:, :n]}
    if "values" in row and "mask" in row:
        n = int(row["mask"].sum())
        return {"values": row["values"][:n]}
    if "pixels" in row and "frame_mask" in row:  # video frames (B, T, C, H, W)
        n = int(row["frame_mask"].sum())
        return {"pixels": row["pixels"][:n]}
    return row


class ArrayLoader:
    """Batches of an ``ArrayDataset`` in the order a ``DataLoader`` over the same split would give.

    Each epoch draws from torch's global generator exactly what ``DataLoader`` + ``RandomSampler``
    draw (a base seed, then the sampler's seed for a permutation), so under the same
    ``seed_everything`` a run on the fast path sees the same batches, in the same order, as on the
    per-sample path (tested), and anything seeded after the loader is unaffected.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, shuffle: bool) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.dataset)
        torch.empty((), dtype=torch.int64).random_()  # DataLoader's per-iterator base seed
        if self.shuffle:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield self.dataset.batch(order[start:start + self.batch_size])


# ----------------------------------------------------------------------------------------- build

def from_dataset(dataset: MultimodalDataset, collator: Collator) -> ArrayDataset:
    """Collates the whole split in chunks and pads the chunks to common shapes."""
    if len(dataset) == 0:
        raise DataError("cannot build in-memory arrays of an empty split")
    chunks = [collator([dataset[i] for i in range(s, min(len(dataset), s + _BUILD_CHUNK))])
              for s in range(0, len(dataset), _BUILD_CHUNK)]
    present = {m: torch.cat([c.present[m] for c in chunks]) for m in chunks[0].present}
    inputs: dict[str, dict[str, Tensor]] = {}
    for modality, tensors in chunks[0].inputs.items():
        inputs[modality] = {}
        for name in tensors:
            parts = [c.inputs[modality][name] for c in chunks]
            shape = tuple(max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim))
            value = PAD_VALUES.get(name, 0.0)  # as the collator pads (log-mel: silence)
            stacked = torch.cat([_pad_to(p, (p.shape[0], *shape), value) for p in parts])
            if value and modality in present:  # absent rows hold zeros, as the collator gives them
                stacked[~present[modality]] = 0
            inputs[modality][name] = stacked
    targets = [c.target for c in chunks]
    target = None if any(t is None for t in targets) else torch.cat(targets)  # type: ignore[arg-type]
    ids = [i for c in chunks for i in c.ids]
    return ArrayDataset(inputs, present, target, ids, dataset.report)


DECODING_LIBRARIES = ("numpy", "torch", "Pillow", "soundfile", "scipy", "transformers", "tokenizers", "av")
"""Distributions whose code turns files into the cached tensors (decoders, mel filters, tokenizers)."""


def _file_digests(records: list[Record], preprocessor: Preprocessor) -> list[list[object]]:
    """(path, SHA-256 of the bytes) of every file the records reference, so edited data is rebuilt.

    Content, not size and mtime: a file rewritten with the same size and its mtime restored (a
    copy that preserves times, a regenerated data set) is a different file. The key is needed
    before anything is decoded (a hit decodes nothing), so each file is read once here; a
    row-referenced file (``train.npy#12``) is read once however many rows name it.
    """
    return [[path, file_digest(path)] for path in referenced_files(records, preprocessor)]


def referenced_files(records: list[Record], preprocessor: Preprocessor) -> list[str]:
    """Every file the records' non-text fields name, sorted, a row-referenced array file once."""
    paths: set[str] = set()
    for record in records:
        for modality in preprocessor.modalities:
            value = record.fields.get(modality)
            if value is not None and preprocessor.kind(modality) != "text":
                paths.add(str(parse_reference(str(value))[0]))
    return sorted(paths)


def preprocessing_identity() -> dict[str, object]:
    """The versions and the code (``mmfuse.core.identity``) that turn records into the tensors."""
    return {"libraries": library_versions(DECODING_LIBRARIES),
            "code": code_identity([Preprocessor, MultimodalDataset, Collator, ArrayDataset], DECODING_LIBRARIES)}


def cache_key(records: list[Record], preprocessor: Preprocessor, task: TargetCodec | None, on_error: str) -> str:
    """SHA-256 over the records, their files' bytes, the fitted preprocessing, its code and the task."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, on_error, type(task).__name__ if task else None,
                              preprocessor.state(), preprocessing_identity()], sort_keys=True, default=str).encode())
    for record in records:
        digest.update(json.dumps([record.id, record.fields, record.target], sort_keys=True, default=str).encode())
    digest.update(json.dumps(_file_digests(records, preprocessor)).encode())
    if task is not None:
        labels = sorted({str(r.target) for r in records})[:10000]
        encoded: list[object] = []
        for label in labels:
            try:
                encoded.append(task.encode_target(label).tolist())
            except (ValueError, TypeError):
                encoded.append(None)
        digest.update(json.dumps([labels, encoded], default=str).encode())
    return digest.hexdigest()[:32]


def _save(folder: Path, data: ArrayDataset) -> None:
    meta: dict[str, object] = {"ids": data.ids, "skipped": data.report.skipped, "skipped_rows": data.report.rows,
                               "tensors": []}
    names: list[list[str]] = []
    flat: dict[str, Tensor] = {}
    for modality, tensors in data.inputs.items():
        for name, tensor in tensors.items():
            flat[f"input.{modality}.{name}"] = tensor
            names.append(["input", modality, name])
    for modality, tensor in data.present.items():
        flat[f"present.{modality}"] = tensor
        names.append(["present", modality, ""])
    if data.target is not None:
        flat["target"] = data.target
        names.append(["target", "", ""])
    meta["tensors"] = names
    for key, tensor in flat.items():
        np.save(folder / f"{key}.npy", tensor.numpy(), allow_pickle=False)
    (folder / "meta.json").write_text(json.dumps(meta))


def _load(folder: Path) -> ArrayDataset:
    meta = json.loads((folder / "meta.json").read_text())
    inputs: dict[str, dict[str, Tensor]] = {}
    present: dict[str, Tensor] = {}
    target = None
    for group, modality, name in meta["tensors"]:
        key = {"input": f"input.{modality}.{name}", "present": f"present.{modality}", "target": "target"}[group]
        # Copy-on-write mapping: pages are read lazily and shared with the OS page cache; the
        # array is writeable (torch warns on read-only buffers) but never written back.
        tensor = torch.from_numpy(np.load(folder / f"{key}.npy", mmap_mode="c", allow_pickle=False))
        if group == "input":
            inputs.setdefault(modality, {})[name] = tensor
        elif group == "present":
            present[modality] = tensor
        else:
            target = tensor
    report = SkipReport(list(meta["skipped"]), list(meta.get("skipped_rows", [])))
    return ArrayDataset(inputs, present, target, list(meta["ids"]), report)


def cached_arrays(records: list[Record], preprocessor: Preprocessor, task: TargetCodec | None, on_error: str,
                  cache_dir: Path | None = None) -> ArrayDataset:
    """The split's ``ArrayDataset``: memory-mapped from the cache, or built once and cached.

    Built in a temporary sibling folder and renamed into place when complete, so an interrupted
    build is never trusted by a later run.
    """
    root = cache_root(cache_dir)
    final = root / cache_key(records, preprocessor, task, on_error)
    if (final / "meta.json").is_file():
        return _load(final)
    dataset = MultimodalDataset(records, preprocessor, task, on_error=on_error)  # type: ignore[arg-type]
    arrays = from_dataset(dataset, Collator(preprocessor, task))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{root}: cannot create the in-memory array cache ({exc})") from exc
    with staged_folder(final, keep_existing=True) as tmp:
        _save(tmp, arrays)
    return _load(final)
