"""Reading a pack from a URL: each split streamed shard by shard through WebDataset, in order.

A pack is a folder of files (``pack.json``, ``<split>-NNNNN.tar``...). Where it lives remotely, its
location is given as a URL that names the folder:

- any URL WebDataset's ``gopen`` opens (``file://``, ``http(s)://``, ``gs://``, ``sftp://``...): a
  file's URL is the location + ``/`` + its name;
- ``s3://bucket/prefix``: read with ``pipe:aws s3 cp s3://bucket/prefix/<name> -`` (the AWS CLI);
- ``pipe:COMMAND`` with ``{}`` where the file's name goes, for anything else that writes a file to
  stdout (``pipe:curl -s https://host/pack/{}``, ``pipe:cat /mnt/pack/{}``).

Why streaming and not the positioned reads of ``PackDataset``: a remote object store serves whole
objects well and byte ranges per sample badly (a request each). Streaming reads each shard once from
start to end, which suits evaluation (one pass, in order); training reads samples in a shuffled order
that is a function of seed + epoch and therefore needs a local (or mounted) pack.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.dataset import MultimodalDataset, Sample, SkipReport
from mmfuse.data.pack_format import sample_from_members

URL_PREFIXES = ("pipe:",)


def is_url(location: str) -> bool:
    """True for ``scheme://...`` and ``pipe:...``; a plain path (even ``C:\\data``) is not a URL."""
    return location.startswith(URL_PREFIXES) or ("://" in location and location.index("://") > 1)


def member_url(location: str, name: str) -> str:
    """The URL of the pack's file ``name`` (see the module docstring for the forms of ``location``)."""
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise ConfigError(f"pack location '{location}': a pipe: command needs '{{}}' where the file name goes, "
                              "e.g. pipe:aws s3 cp s3://bucket/pack/{} -")
        return location.replace("{}", name)
    if location.startswith("s3://"):
        return f"pipe:aws s3 cp {shlex.quote(location.rstrip('/') + '/' + name)} -"
    return location.rstrip("/") + "/" + name


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise ConfigError("reading a pack from a URL uses WebDataset: pip install 'mmfuse[pack]'") from None
    return webdataset


def read_url(url: str) -> bytes:
    """The whole content at ``url`` (``gopen``); any failure is a DataError naming the URL."""
    gopen = _webdataset().gopen
    try:
        with gopen(url, "rb") as handle:
            data: bytes = handle.read()
    except Exception as exc:  # gopen raises what each scheme's opener raises (OSError, IOError, ValueError...)
        raise DataError(f"cannot read {url}: {exc}") from None
    if not data:  # a pipe: command that failed writes nothing (its exit status comes too late to check)
        raise DataError(f"cannot read {url}: nothing was read")
    return data


def read_pack_state(location: str) -> dict[str, Any]:
    """``pack.json`` of the pack at ``location``."""
    url = member_url(location, "pack.json")
    try:
        return dict(json.loads(read_url(url)))
    except ValueError as exc:
        raise DataError(f"{url}: not a pack's pack.json ({exc})") from None


class StreamedSplit(MultimodalDataset, IterableDataset[Sample]):
    """One split of a remote pack, streamed in order (a DataLoader iterates it; ``len`` is pack.json's)."""

    def __init__(self, location: str, shards: list[str], count: int, report: SkipReport | None = None) -> None:
        # No super().__init__(): the samples stay remote until iterated.
        self.location, self.shards, self.count = location, list(shards), count
        self.report = report or SkipReport()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        raise TypeError("a pack read from a URL is streamed in order: iterate it (positioned reads need a local pack)")

    def __iter__(self) -> Iterator[Sample]:
        webdataset = _webdataset()
        urls = [member_url(self.location, name) for name in self.shards]
        stream = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)
        seen = 0
        try:
            for members in stream:
                where = f"{members.get('__url__', self.location)} (sample {members.get('__key__')})"
                seen += 1
                yield sample_from_members(members, where)
        except DataError:
            raise
        except Exception as exc:  # a failed download or a damaged tar, from whichever layer noticed it
            raise DataError(f"cannot stream the pack {self.location}: {exc}") from None
        if seen != self.count:
            raise DataError(f"the pack {self.location} streamed {seen} samples of {self.count} (pack.json): "
                            "a shard is missing or truncated")

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        """Every sample, streamed now."""
        return list(iter(self))

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        raise AttributeError("StreamedSplit.samples is read-only: the samples are in the pack")
