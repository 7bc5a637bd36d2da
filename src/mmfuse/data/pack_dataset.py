"""One split of a pack as a map-style dataset that reads each sample from its shard when asked.

Why map-style with positioned reads instead of an iterable over whole shards: the training loader
(``mmfuse.engine.loader``) then keeps every property it has on the other paths (order a function of
seed + epoch, resumable mid-epoch, sharded by DDP rank with equal batch counts, whole batches
spread over DataLoader workers) and a pack trains on exactly the batches the per-sample path gives.
Memory is bounded by the index alone, four int64 per sample (shard, span, member layout; the distinct
layouts are few: text lengths x missing modalities), no ids or tensors (the id is read back with the
sample), plus the batches in flight; nothing of a shard is cached beyond what
the OS page cache keeps. The price is one positioned read (``os.pread``) per sample rather than a
sequential scan: fine on local disks, slower on network file systems that penalise random reads.

Every shard is verified against the digests of its index when the dataset is made
(``mmfuse.data.pack_integrity.verify_shard``: hashed once, then remembered by size and modification
time), before any sample is read, so a damaged shard stops a run at its start with the shard and
member named, and DataLoader workers (forked after) inherit shards already proven.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mmfuse.core.errors import DataError
from mmfuse.data.dataset import MultimodalDataset, Sample, SampleView, SkipReport
from mmfuse.data.pack_format import INDEX_SUFFIX, Layout, ShardIndex, decode_sample
from mmfuse.data.pack_integrity import REPAIR_HINT, verify_shard

OPEN_SHARDS = 32
"""Shard files a process keeps open at once: a shuffled epoch visits every shard, and a pack of thousands
of shards would otherwise run into the limit on open files."""


class PackDataset(MultimodalDataset):
    """The samples of some shards, in shard order; ``[i]`` reads sample i from disk.

    ``fetch`` (a remote pack, ``mmfuse.data.pack_cache``): the shards' ``indexes`` are given, and shard
    ``n`` is ``fetch(n)``'s local, verified path, asked for when a sample of it is first read in a
    process; ``paths`` then name the shards for messages. Without it every shard is verified now."""

    def __init__(self, shards: list[Path], report: SkipReport | None = None, indexes: list[ShardIndex] | None = None,
                 fetch: Callable[[int], Path] | None = None) -> None:
        # No super().__init__(): the samples are on disk, already preprocessed.
        self.paths = list(shards)
        self.report = report or SkipReport()
        self.fetch = fetch
        rows: list[np.ndarray] = []
        self.layouts: list[Layout] = []  # the distinct member layouts: few (text lengths x missing modalities)
        known: dict[Layout, int] = {}
        self.shard_sizes: list[int] = []
        """Samples per shard, in order: what a shard-aware sampler (``mmfuse.engine.loader``) deals out."""
        for number, path in enumerate(self.paths):
            if indexes is not None:
                index = indexes[number]
            else:
                index = ShardIndex.read(path.with_name(path.name + INDEX_SUFFIX))
                verify_shard(path, index)  # before any sample of it is read: its bytes are the ones the index proves
            self.shard_sizes.append(len(index.spans))
            spans = np.asarray(index.spans, dtype=np.int64).reshape(-1, 2)
            assert index.layouts is not None  # verify_shard: a shard with digests has member layouts
            layout_ids = np.empty(len(spans), dtype=np.int64)
            for row, layout in enumerate(index.layouts):
                if layout not in known:
                    known[layout] = len(self.layouts)
                    self.layouts.append(layout)
                layout_ids[row] = known[layout]
            rows.append(np.column_stack([np.full(len(spans), number, dtype=np.int64), spans, layout_ids]))
        self.index = np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def _fd(self, number: int) -> int:
        """A descriptor of shard ``number``; at most ``OPEN_SHARDS`` stay open (least recently used closed)."""
        if self._pid != os.getpid():  # a forked DataLoader worker: its own descriptors
            self._fds, self._pid = OrderedDict(), os.getpid()
        if number in self._fds:
            self._fds.move_to_end(number)
            return self._fds[number]
        if len(self._fds) >= OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        path = self.paths[number] if self.fetch is None else self.fetch(number)
        self._fds[number] = os.open(path, os.O_RDONLY)
        return self._fds[number]

    def __getitem__(self, index: int) -> Sample:
        number, start, end, layout = self.index[index].tolist()
        data = bytearray(end - start)  # writable: the tensors are views of it (see decode_sample)
        read = os.preadv(self._fd(number), [data], start)
        where = f"{self.paths[number]} (sample {index}, bytes {start}-{end})"
        if read != end - start:
            raise DataError(f"{where}: pack shard is truncated{REPAIR_HINT}")
        return decode_sample(data, where, self.layouts[layout])

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                os.close(fd)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": -1}  # descriptors never travel to another process

    @property  # type: ignore[override]
    def samples(self) -> Sequence[Sample]:
        """The samples as a lazy sequence (each read from disk when indexed)."""
        return SampleView(self.__getitem__, len(self))

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        raise AttributeError("PackDataset.samples is read-only: the samples are in the pack")
