"""Batches whose order is a function of (seed, epoch), so a run can resume part-way through an epoch.

torch's ``RandomSampler`` draws each epoch's permutation from the global generator, so the order
depends on everything that drew from it before (model initialisation, dropout, the loader's own
base seed) and cannot be replayed from a checkpoint written in the middle of an epoch. Here the
permutation of epoch ``e`` comes from a private generator seeded with ``seed + e``, as
``DistributedSampler`` does, and nothing touches the global generator: that one belongs to the model
(dropout, modality dropout), and the checkpoint saves and restores it.

``ResumableLoader`` reports which epoch it is in and how many of its batches it has handed out
(``state_dict``); Lightning stores that in the checkpoint and hands it back on resume
(``load_state_dict``), and the resumed epoch skips those batches without loading them. Lightning
calls ``sampler.set_epoch`` at the start of every epoch (it looks for ``.sampler`` and
``.batch_sampler.sampler``, never ``.batch_sampler`` itself).

Under DDP (``torch.distributed`` initialised) each rank takes every world-size-th index of the
epoch's order, as ``DistributedSampler`` does: all ranks draw the same permutation (same seed),
and the order is topped up by wrapping around so that every rank gets the same number of samples
and batches (a rank with one batch more would wait in an all-reduce for ever). Batch k of all
ranks together is then batch k of one process with ``batch_size x world_size``.

``data.pack_order: shards`` (``ShardOrder``) is the order for a pack larger than a node's cache: each
rank is dealt a fixed share of the pack's shards (a permutation by ``seed``), visits them in an
order drawn per epoch, and shuffles samples within windows of a few consecutive shards; so a node
downloads and reads only its own shards, a window at a time. Still a function of (seed, epoch, rank,
world): resumable mid-epoch in the same way, with equal batch counts on every rank (topped up from
the rank's own order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmfuse.data.dataset import Collator, MultimodalDataset
from mmfuse.data.lazy import SkipAwareCollator, absorb_skips, lazy_base
from mmfuse.data.memory import ArrayDataset
from mmfuse.engine.interrupts import ignore_stop_signals


class EpochBatches:
    """A batch sampler: lists of indices, shuffled by ``seed + epoch`` (or in order), less the first
    ``skip`` batches.

    A pass depends on (epoch, skip) only and changes neither: a multi-process DataLoader starts two
    passes when it creates its iterator, and both must be the same.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int,
                 shards: ShardOrder | None = None) -> None:
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.shards = shards if shuffle else None
        self.epoch = 0
        self.skip = 0
        self.current = (0, 0)
        """(epoch, first batch) of the pass most recently started."""

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0  # a skip set for a resumed epoch never carries into another one
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self._per_rank() / self.batch_size)

    def _per_rank(self) -> int:
        if self.shards is not None:
            return self.shards.per_rank(_rank_and_world()[1], self.seed)
        return math.ceil(self.size / _rank_and_world()[1])

    def order(self) -> torch.Tensor:
        """This rank's indices for the current epoch."""
        if self.shards is not None:
            return self.shards.order(self.seed, self.epoch, *_rank_and_world())
        if not self.shuffle:
            order = torch.arange(self.size)
        else:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        rank, world = _rank_and_world()
        if world == 1:
            return order
        padded = self._per_rank() * world
        if padded > self.size:
            order = torch.cat([order, order[: padded - self.size]])
        return order[rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        # Decided when the pass starts, not lazily: DataLoader workers fetch ahead.
        order, size = self.order(), self.batch_size
        self.current = (self.epoch, self.skip)
        return iter([order[b * size:(b + 1) * size].tolist() for b in range(self.skip, len(self))])


class ShardOrder:
    """The shard-aware order of ``data.pack_order: shards`` (module docstring) for shards of these sizes."""

    def __init__(self, shard_sizes: list[int], window: int) -> None:
        self.sizes, self.window = list(shard_sizes), max(1, window)
        self.starts = [0]
        for size in self.sizes[:-1]:
            self.starts.append(self.starts[-1] + size)

    def _share(self, seed: int, rank: int, world: int) -> list[int]:
        """The shards dealt to ``rank``: fixed for the run (by ``seed``), so its node caches only them."""
        if len(self.sizes) < world:
            raise ValueError(f"data.pack_order shards deals whole shards to ranks: the split has {len(self.sizes)} "
                             f"shards for {world} ranks; pack with a smaller --shard-size or use pack_order samples")
        dealt = torch.randperm(len(self.sizes), generator=torch.Generator().manual_seed(seed)).tolist()
        return dealt[rank::world]

    def per_rank(self, world: int, seed: int = 0) -> int:
        """Samples per rank: the largest share (every rank hands out as many batches)."""
        if world == 1:
            return sum(self.sizes)
        return max(sum(self.sizes[s] for s in self._share(seed, rank, world)) for rank in range(world))

    def order(self, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + epoch)
        mine = self._share(seed, rank, world)
        mine = [mine[i] for i in torch.randperm(len(mine), generator=generator).tolist()]
        parts = []
        for first in range(0, len(mine), self.window):
            indices = torch.cat([torch.arange(self.starts[s], self.starts[s] + self.sizes[s])
                                 for s in mine[first:first + self.window]])
            parts.append(indices[torch.randperm(len(indices), generator=generator)])
        order = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        wanted = self.per_rank(world, seed)
        if len(order) == 0 and wanted:
            raise ValueError(f"rank {rank} was dealt only empty shards (every sample of them skipped at packing)")
        while len(order) < wanted:  # topped up from this rank's own shards: no other node's shard is read
            order = torch.cat([order, order[: wanted - len(order)]])
        return order


class EpochTagged:
    """``EpochBatches`` whose indices are (epoch, index) pairs, for a dataset that augments per epoch.

    DataLoader workers (persistent ones above all) never see the main process's epoch counter, so the
    epoch travels with each index (``mmfuse.data.augment.AugmentedDataset``).
    """

    def __init__(self, sampler: EpochBatches) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = iter(self.sampler)  # starts the pass: sampler.current is now this one's
        epoch = self.sampler.current[0]
        return iter([[(epoch, i) for i in batch] for batch in batches])


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableLoader:
    """The batches of one split, per sample through a ``DataLoader`` or sliced from an ``ArrayDataset``.

    Both paths give the same batches in the same order for the same (seed, epoch).
    """

    def __init__(self, dataset: MultimodalDataset, collator: Collator, batch_size: int, shuffle: bool,
                 num_workers: int, seed: int, shards: ShardOrder | None = None) -> None:
        self.dataset = dataset
        self.sampler = EpochBatches(len(dataset), batch_size, shuffle, seed, shards)
        self.batch_sampler = None  # read by Lightning beside .sampler, as on a DataLoader
        self._position = (0, 0)
        self._generator = torch.Generator()  # the DataLoader's base seed: never drawn from the global one
        self._loader: DataLoader[Any] | None = None
        self._lazy = lazy_base(dataset)
        if not isinstance(dataset, ArrayDataset):
            batch_sampler: Any = EpochTagged(self.sampler) if getattr(dataset, "wants_epoch", False) else self.sampler
            collate: Any = collator if self._lazy is None else SkipAwareCollator(collator)
            self._loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                                      num_workers=num_workers, persistent_workers=num_workers > 0,
                                      generator=self._generator, worker_init_fn=ignore_stop_signals)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if self._loader is not None:
            self._generator.manual_seed(sampler.seed + sampler.epoch)
            batches: Iterator[Any] = iter(self._loader)
        else:
            assert isinstance(self.dataset, ArrayDataset)
            dataset = self.dataset
            batches = (dataset.batch(torch.tensor(index)) for index in sampler)
        epoch, handed_out = sampler.current  # both started their pass over the sampler above
        sampler.skip = 0  # the skip of a resumed epoch is used once
        for batch in batches:
            handed_out += 1
            self._position = (epoch, handed_out)
            if self._lazy is not None:  # skipped samples reported here, in the main process
                batch = absorb_skips(self._lazy, batch)
                if batch is None:  # every sample of it was skipped
                    continue
            yield batch

    def close(self) -> None:
        """Ends the worker processes now.

        They ignore SIGTERM and Ctrl-C (``ignore_stop_signals``), so they must not be left to the
        interpreter's exit, which ends daemonic children with SIGTERM and then waits for them.
        """
        iterator = getattr(self._loader, "_iterator", None)  # where a DataLoader keeps persistent workers
        if iterator is None:
            return
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # asks them to finish, through their queues
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():  # torch's fallback is SIGTERM, which they ignore
                worker.kill()
                worker.join()
        assert self._loader is not None
        self._loader._iterator = None

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands: its number and how many batches it has handed out."""
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues after ``state``: the rest of its epoch, or the next epoch when that one was done."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.epoch, self.sampler.skip = epoch, batches
        self._position = (epoch, batches)


class LoaderPosition(L.Callback):
    """Carries the training loader's position through checkpoints as callback state.

    Lightning saves a stateful loader's ``state_dict`` itself, but hands it back only when its fit
    loop sets up the data after reading the checkpoint. ``trainer.estimated_stepping_batches`` (which
    the cosine schedule reads while the optimizers are configured, before the checkpoint is read)
    sets the data up earlier, and the saved position is then silently dropped: the resumed epoch
    would start over. Callback state is restored before that point, and the loader's batches are
    drawn only when training starts, so the position arrives in time either way.
    """

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.loader.load_state_dict(state_dict)
