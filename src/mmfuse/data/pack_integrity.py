"""Shards that prove their bytes: a digest per shard and per member, checked before a sample is read.

A shard's size alone does not show a flipped bit: one in a float's exponent made a pixel 1.6e38 and
training went on. So every shard index records the SHA-256 of its shard (``sha256sum`` gives the same
hex) and, per sample, a short digest of each member's blocks: the tar header blocks before the member
and its padded data, so the members of a sample cover its whole span. A reader checks the shard's
digest once per shard per process before reading any sample of it (``verify_shard``); only when it
differs are the member digests compared, to name the damaged member.

Hashing a pack costs about a second per 1.7 GB here; so that a pack is not hashed again by every run,
a verified local shard is remembered under the cache home (``verified/``, a folder per pack) by its path, size,
modification time and the digest of its index: a shard rewritten since (even to the same size) is
hashed again. A change that keeps size and modification time (a deliberate ``touch -d``) goes
unnoticed by the cache; ``mmfuse data verify`` always hashes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.cache_home import cache_dir
from mmfuse.core.errors import DataError
from mmfuse.data.pack_format import BLOCK, Layout, ShardIndex

MEMBER_DIGEST_CHARS = 32
"""Hex characters kept of a member's SHA-256 (128 bits): enough to tell damage, a third of the index."""

CHUNK = 8 << 20
REPAIR_HINT = "; run `mmfuse data pack` again with the same config and --out to repair it"
_VERIFIED: set[tuple[str, int, int, str]] = set()
"""Shards verified by this process: (path, size, mtime_ns, digest of the index)."""


def member_regions(span: tuple[int, int], layout: Layout) -> list[tuple[int, int]]:
    """The absolute byte range of each member of one sample: from the end of the previous member (its
    tar headers come first) to the end of its padded data; together they cover the span."""
    start, _ = span
    regions, previous = [], start
    for _, offset, size in layout:
        end = start + offset + -(-size // BLOCK) * BLOCK
        regions.append((previous, end))
        previous = end
    return regions


def _member_digest(data: bytes | mmap.mmap | memoryview, region: tuple[int, int]) -> str:
    return hashlib.sha256(data[region[0]:region[1]]).hexdigest()[:MEMBER_DIGEST_CHARS]


def shard_digests(path: Path, spans: Sequence[tuple[int, int]],
                  layouts: Sequence[Layout]) -> tuple[str, list[list[str]]]:
    """The SHA-256 of the shard at ``path`` and its member digests (see the module docstring)."""
    with open(path, "rb") as handle, _mapped(handle) as data:
        whole = hashlib.sha256(data).hexdigest()
        members = [[_member_digest(data, r) for r in member_regions(span, layout)]
                   for span, layout in zip(spans, layouts, strict=True)]
    return whole, members


def verify_shard(path: Path, index: ShardIndex, label: str | None = None, use_cache: bool = True) -> None:
    """A ``DataError`` naming the shard (``label``, default its path) and the damaged member unless the
    file at ``path`` is the shard its index describes; cached as the module docstring says (unless not
    ``use_cache``: then always hashed)."""
    where = label or str(path)
    if index.sha256 is None:
        raise DataError(f"pack shard {where} has no digest in its index (written before packs carried digests)"
                        f"{REPAIR_HINT}")
    try:
        stat = path.stat()
    except OSError:
        raise DataError(f"pack shard {where} is missing (its index is there){REPAIR_HINT}") from None
    if stat.st_size != index.bytes:
        raise DataError(f"pack shard {where} is truncated or damaged: {stat.st_size} bytes, its index records "
                        f"{index.bytes}{REPAIR_HINT}")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, hashlib.sha256(index.to_json().encode()).hexdigest())
    if use_cache and (key in _VERIFIED or _stamp_matches(key)):
        _VERIFIED.add(key)
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != index.sha256:
        raise DataError(f"pack shard {where} is damaged: {damage(path, index)} does not match the digest in its "
                        f"index{REPAIR_HINT}")
    _VERIFIED.add(key)
    _write_stamp(key)


def remember_verified(path: Path, index: ShardIndex) -> None:
    """Records ``path`` as verified against ``index`` without hashing it again: for a shard whose bytes were
    hashed and compared while they were written (``mmfuse.data.pack_cache`` downloads)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, hashlib.sha256(index.to_json().encode()).hexdigest())
    _VERIFIED.add(key)
    _write_stamp(key)


def damage(path: Path, index: ShardIndex) -> str:
    """Which part of a shard whose digest differs is damaged, in words (the first damaged member, and
    how many more)."""
    assert index.layouts is not None and index.members is not None
    found: list[str] = []
    covered = 0
    with open(path, "rb") as handle, _mapped(handle) as data:
        for number, (span, layout, digests) in enumerate(zip(index.spans, index.layouts, index.members, strict=True)):
            for region, (name, _, _), want in zip(member_regions(span, layout), layout, digests, strict=True):
                if _member_digest(data, region) != want:
                    found.append(f"member {index.first_key + number:010d}.{name} (sample {number}, "
                                 f"bytes {region[0]}-{region[1]})")
            covered = span[1]
    if not found:
        return f"the tar's closing blocks (bytes {covered}-{index.bytes})"
    more = f" (and {len(found) - 1} more member{'s' * (len(found) > 2)})" if len(found) > 1 else ""
    return found[0] + more


class _mapped:
    """The file's bytes as a read-only map (an empty file as b"", which ``mmap`` cannot map)."""

    def __init__(self, handle: object) -> None:
        self.handle = handle
        self.map: mmap.mmap | None = None

    def __enter__(self) -> bytes | mmap.mmap:
        fileno = self.handle.fileno()  # type: ignore[attr-defined]
        if os.fstat(fileno).st_size == 0:
            return b""
        self.map = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
        return self.map

    def __exit__(self, *exc: object) -> None:
        if self.map is not None:
            self.map.close()


def _stamp_path(key: tuple[str, int, int, str]) -> Path:
    """One folder per pack (one entry of ``mmfuse cache list``), one small file per shard."""
    shard = Path(key[0])
    return cache_dir("verified") / hashlib.sha256(str(shard.parent).encode()).hexdigest()[:32] / (shard.name + ".txt")


def _stamp_text(key: tuple[str, int, int, str]) -> str:
    return "\n".join(map(str, key)) + "\n"


def _stamp_matches(key: tuple[str, int, int, str]) -> bool:
    try:
        return _stamp_path(key).read_text() == _stamp_text(key)
    except (OSError, UnicodeDecodeError):
        return False


def _write_stamp(key: tuple[str, int, int, str]) -> None:
    """Remembers a verified shard; a cache home that cannot be written only costs a hash next time."""
    try:
        path = _stamp_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, _stamp_text(key))
    except OSError:
        pass
