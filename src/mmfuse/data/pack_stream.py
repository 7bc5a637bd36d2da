"""Reading a pack from a URL: each split streamed shard by shard through fsspec, in order, verified.

A pack is a folder of files (``pack.json``, ``<split>-NNNNN.tar`` and its index...). Where it lives
remotely, its location is an fsspec URL that names the folder (``s3://bucket/prefix``, ``gs://...``,
``https://host/pack``, ``file:///mnt/pack``...); a file's URL is the location + ``/`` + its name.
Credentials and endpoints come from each backend's usual settings (for S3: ``AWS_PROFILE``,
``AWS_ENDPOINT_URL``...).

No shell, ever: WebDataset's ``gopen`` runs ``curl``/``aws``/``gsutil`` through a shell string, and a
``pipe:`` location pasted the shard names from the pack's own pack.json into a command, so whoever
could write the bucket could run commands on the reader's machine. fsspec reads with library calls;
``pipe:`` is refused, and shard names are checked against the pack's naming scheme
(``checked_shards``) before any URL is built from them.

Each shard is downloaded once, to a temporary file, while its SHA-256 is computed; it is compared with
the shard's index before a sample of it is decoded, so a damaged or tampered shard stops the
evaluation with the shard and member named, and memory stays flat (one shard on disk at a time, a
sample in memory). Why streaming and not the positioned reads of ``PackDataset``: an object store
serves whole objects well and byte ranges per sample badly (a request each); training reads samples
in a shuffled order that is a function of seed + epoch and therefore needs a local (or mounted) pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from mmfuse.core.errors import ConfigError, DataError
from mmfuse.core.locations import PROTOCOLS, check_location, is_url, member_url
from mmfuse.data.dataset import MultimodalDataset, Sample, SkipReport
from mmfuse.data.pack_format import INDEX_SUFFIX, MAX_INDEX_BYTES, ShardIndex, decode_sample
from mmfuse.data.pack_integrity import CHUNK, damage

__all__ = ["PROTOCOLS", "StreamedSplit", "check_location", "download_shard", "is_url", "member_url",
           "read_pack_state", "read_url"]


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise ConfigError("reading a pack from a URL uses fsspec: pip install 'mmfuse[remote]'") from None
    return fsspec


def _open(url: str) -> Any:
    """An open binary stream of ``url``; a missing backend (s3fs, gcsfs...) or failure is one line."""
    try:
        return _fsspec().open(url, "rb").open()
    except ImportError as exc:
        raise ConfigError(f"reading {url} needs {exc.name or 'the backend of its protocol'}: "
                          "pip install 'mmfuse[remote]' (gs:// also needs gcsfs)") from None
    except Exception as exc:  # each backend raises its own (FileNotFoundError, ClientError, aiohttp errors...)
        raise DataError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None


def read_url(url: str, limit: int = MAX_INDEX_BYTES) -> bytes:
    """The whole content at ``url``, refused past ``limit`` bytes (read no further than that)."""
    with _open(url) as handle:
        try:
            data: bytes = handle.read(limit + 1)
        except Exception as exc:
            raise DataError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None
    if len(data) > limit:
        raise DataError(f"{url} is larger than {limit:,} bytes: not a file of a pack")
    return data


def read_pack_state(location: str) -> dict[str, Any]:
    """``pack.json`` of the pack at ``location``."""
    url = member_url(location, "pack.json")
    try:
        state = json.loads(read_url(url))
    except ValueError as exc:
        raise DataError(f"{url}: not a pack's pack.json ({exc})") from None
    if not isinstance(state, dict):
        raise DataError(f"{url}: not a pack's pack.json (not a JSON object)")
    return state


def download_shard(url: str, index: ShardIndex, path: Path) -> Path:
    """The shard at ``url`` written to ``path``, after its size and SHA-256 matched its index."""
    digest, size = hashlib.sha256(), 0
    with _open(url) as source, open(path, "wb") as target:
        try:
            while chunk := source.read(min(CHUNK, index.bytes + 1 - size)):
                digest.update(chunk)
                target.write(chunk)
                size += len(chunk)
                if size > index.bytes:
                    break
        except Exception as exc:
            raise DataError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None
    if size != index.bytes:
        raise DataError(f"pack shard {url} is truncated or damaged: {'more than ' * (size > index.bytes)}{size} bytes, "
                        f"its index records {index.bytes}")
    if digest.hexdigest() != index.sha256:
        raise DataError(f"pack shard {url} is damaged: {damage(path, index)} does not match the digest in its index")
    return path


class StreamedSplit(MultimodalDataset, IterableDataset[Sample]):
    """One split of a remote pack, streamed in order (a DataLoader iterates it; ``len`` is pack.json's).
    ``shards`` must come from ``checked_shards``."""

    def __init__(self, location: str, shards: list[str], count: int, report: SkipReport | None = None) -> None:
        # No super().__init__(): the samples stay remote until iterated.
        self.location, self.shards, self.count = check_location(location), list(shards), count
        self.report = report or SkipReport()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        raise TypeError("a pack read from a URL is streamed in order: iterate it (positioned reads need a local pack)")

    def __iter__(self) -> Iterator[Sample]:
        seen = 0
        with tempfile.TemporaryDirectory(prefix="mmfuse-shard-") as scratch:
            for name in self.shards:
                url = member_url(self.location, name)
                index = ShardIndex.parse(read_url(url + INDEX_SUFFIX), url + INDEX_SUFFIX)
                if index.name != name:
                    raise DataError(f"{url}{INDEX_SUFFIX} is the index of '{index.name[:80]}', not of {name}")
                if index.sha256 is None or index.layouts is None:
                    raise DataError(f"pack shard {url} has no digest in its index (written before packs carried "
                                    "digests): pack the data again")
                path = download_shard(url, index, Path(scratch) / name)
                try:
                    with open(path, "rb") as handle:
                        for number, ((start, end), layout) in enumerate(zip(index.spans, index.layouts, strict=True)):
                            data = bytearray(end - start)
                            handle.seek(start)
                            handle.readinto(data)
                            seen += 1
                            yield decode_sample(data, f"{url} (sample {number})", layout)
                finally:
                    os.unlink(path)
        if seen != self.count:
            raise DataError(f"the pack {self.location} streamed {seen} samples of {self.count} (pack.json): "
                            "its shard indexes and pack.json disagree")

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        """Every sample, streamed now."""
        return list(iter(self))

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        raise AttributeError("StreamedSplit.samples is read-only: the samples are in the pack")
