"""A bounded local cache of a remote pack's shards: what training from ``s3://``, ``gs://`` or ``https://`` reads.

Why a cache and not streaming: training reads samples by position in an order that is a function of
seed + epoch (``mmfuse.engine.loader``), resumes mid-epoch and splits the work over ranks and loader
workers; an object store serves whole objects well and byte ranges badly (a request each). So each
shard is downloaded whole, once, the first time a sample of it is read, hashed while it downloads and
compared with its index (whose digest ``pack.json`` also records) before it is renamed into the cache;
every later read is a positioned read of a local, proven file, as for a local pack.

Layout: ``$MMFUSE_CACHE/packs/<digest of the URL and of pack.json>/`` holds the pack's ``pack.json``,
its shard indexes (fetched when the pack is opened: ~200 bytes per sample), ``tokenizers/`` when the
pack has pretrained tokenizer files, and the shards downloaded so far. A pack rewritten at the same URL
has another pack.json and so another folder: nothing cached of the old one is ever read for it.

Bounded: after each download the folder's shards are trimmed to ``limit_bytes``, least recently read
first, never the shard just fetched. A shard that a loader worker still has open stays readable after
it is removed (POSIX keeps an open file's data), and is downloaded again when next needed. Concurrent
downloads of one shard (loader workers, ranks on one node) wait on a lock file per shard; one downloads.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from filelock import FileLock

from mmfuse.core.atomic import atomic_file, write_text_atomic
from mmfuse.core.cache_home import cache_dir
from mmfuse.core.errors import DataError
from mmfuse.core.locations import check_location, member_url
from mmfuse.data.pack_format import INDEX_SUFFIX, ShardIndex
from mmfuse.data.pack_integrity import remember_verified, verify_shard
from mmfuse.data.pack_stream import _fsspec, download_shard, read_url

DEFAULT_LIMIT_GB = 20.0
MAX_TOKENIZER_FILES = 64
"""A pretrained tokenizer is a handful of files (vocab, merges, config); more is not a tokenizer."""
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class PackCache:
    """The cache folder of the pack at ``location`` whose ``pack.json`` is ``state_bytes``."""

    def __init__(self, location: str, state_bytes: bytes, limit_bytes: int | None = None,
                 root: Path | None = None) -> None:
        self.location = check_location(location)
        key = hashlib.sha256(self.location.encode() + b"\n" + hashlib.sha256(state_bytes).digest()).hexdigest()[:32]
        self.folder = (root or cache_dir("packs")) / key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit = int(DEFAULT_LIMIT_GB * 2**30) if limit_bytes is None else int(limit_bytes)
        if not (self.folder / "pack.json").is_file():
            write_text_atomic(self.folder / "source.txt", self.location + "\n")
            with atomic_file(self.folder / "pack.json") as tmp:
                tmp.write_bytes(state_bytes)
        self.trim()  # a smaller limit than the last run's applies from the start

    def index(self, name: str, want_sha256: str | None = None) -> ShardIndex:
        """The index of shard ``name`` (fetched once into the cache), checked to be this shard's, with a
        digest, and the digest ``pack.json`` records for it (``want_sha256``) when it records one."""
        path = self.folder / (name + INDEX_SUFFIX)
        url = member_url(self.location, name) + INDEX_SUFFIX
        if path.is_file():
            index = ShardIndex.read(path)
        else:
            data = read_url(url)
            index = ShardIndex.parse(data, url)
            with atomic_file(path) as tmp:
                tmp.write_bytes(data)
        if index.name != name:
            raise DataError(f"{url} is the index of '{index.name[:80]}', not of {name}")
        if index.sha256 is None or index.layouts is None:
            raise DataError(f"pack shard {member_url(self.location, name)} has no digest in its index (written "
                            "before packs carried digests): pack the data again")
        if want_sha256 is not None and index.sha256 != want_sha256:
            raise DataError(f"{url} records another shard digest than {member_url(self.location, 'pack.json')}: the "
                            "pack was rewritten while it was read, or tampered with; open it again")
        return index

    def shard(self, name: str, index: ShardIndex) -> Path:
        """The local, verified copy of shard ``name``: downloaded now unless already cached."""
        path = self.folder / name
        with FileLock(str(self.folder / (name + ".lock"))):
            if path.is_file():
                try:
                    verify_shard(path, index, member_url(self.location, name))
                    os.utime(path)  # recently read: trimmed last
                    return path
                except DataError:
                    path.unlink(missing_ok=True)  # a damaged cached copy: fetched again
            with atomic_file(path) as tmp:
                download_shard(member_url(self.location, name), index, tmp)
            remember_verified(path, index)  # hashed while it downloaded
        self.trim(keep=name)
        return path

    def trim(self, keep: str | None = None) -> list[str]:
        """Removes the least recently read shards until the cached shards fit the limit; returns their names."""
        shards = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".tar") and entry.is_file():
                stat = entry.stat()
                shards.append((stat.st_mtime_ns, entry.name, stat.st_size))
        total = sum(size for _, _, size in shards)
        removed = []
        for _, name, size in sorted(shards):
            if total <= self.limit:
                break
            if name == keep:
                continue
            (self.folder / name).unlink(missing_ok=True)
            total -= size
            removed.append(name)
        return removed

    def tokenizers(self, assets: Any) -> Path:
        """The cache folder, with the pack's ``tokenizers/`` files fetched into it when the pack has any
        (what ``Preprocessor.from_state`` reads pretrained tokenizers from). ``assets`` is pack.json's list
        of them (relative names); a pack written before it was recorded is listed through fsspec.
        Bounded in count and size; each name must be a plain relative path."""
        target = self.folder / "tokenizers"
        done = self.folder / "tokenizers.done"
        if done.is_file():
            return self.folder
        root = "tokenizers"
        if isinstance(assets, list):
            files = [f"{root}/{name}" for name in assets if isinstance(name, str)]
        else:
            fs, root = _filesystem(member_url(self.location, "tokenizers"))
            try:
                files = [path for path in fs.find(root) if not path.endswith("/")]
            except FileNotFoundError:
                files = []
            except Exception as exc:
                raise DataError(f"cannot list {root}: {type(exc).__name__}: {exc}") from None
        if len(files) > MAX_TOKENIZER_FILES:
            raise DataError(f"{member_url(self.location, 'tokenizers')} holds {len(files)} files, more than a "
                            f"pack's tokenizers ({MAX_TOKENIZER_FILES})")
        budget = MAX_TOKENIZER_BYTES
        for remote in files:
            relative = remote[len(root.rstrip("/")) + 1:]
            parts = relative.split("/")
            if not all(_SAFE_NAME.match(part) and part not in (".", "..") for part in parts):
                raise DataError(f"{remote}: not a tokenizer file name a pack writes")
            data = read_url(member_url(self.location, "tokenizers/" + relative), limit=budget)
            budget -= len(data)
            with atomic_file(target.joinpath(*parts)) as tmp:
                tmp.write_bytes(data)
        write_text_atomic(done, f"{len(files)}\n")
        return self.folder


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path within it."""
    try:
        fs, path = _fsspec().core.url_to_fs(url)
    except ImportError as exc:
        from mmfuse.core.errors import ConfigError

        raise ConfigError(f"reading {url} needs {exc.name or 'the backend of its protocol'}: "
                          "pip install 'mmfuse[remote]'") from None
    return fs, path
