"""Reading one sample's run of tar blocks in a pack shard without ``tarfile``: the member names and where
their bytes lie (``span_layout``), checksums verified. See ``span_layout`` for why."""

from __future__ import annotations

import tarfile

import numpy as np


def span_members(data: bytes | bytearray) -> list[tuple[str, memoryview]]:
    """(name, content) of the regular files in a run of tar blocks: one sample's span of a shard."""
    view = memoryview(data)
    return [(name, view[offset:offset + size]) for name, offset, size in span_layout(data)]


def span_layout(data: bytes | bytearray) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files in a run of tar blocks: one sample's span of a shard.

    Why not ``tarfile``: opening a ``TarFile`` per sample and its generic member handling took 60% of
    the time of reading a pack (measured: 1.3 s of 2.1 s for 1,600 samples); a span holds a handful
    of members that our own writer made (POSIX ustar headers, each with a PAX header carrying the
    path), so this reads exactly that format: header checksums verified, PAX ``path`` records and
    GNU long names honoured, anything else refused (ValueError).
    """
    members: list[tuple[str, int, int]] = []
    view = memoryview(data)
    offset, long_name = 0, None
    headers: list[int] = []
    checksums: list[int] = []
    while offset + _BLOCK <= len(data):
        header = bytes(view[offset:offset + _BLOCK])
        if header == _ZERO_BLOCK:
            break
        headers.append(offset)
        checksums.append(int(header[148:156].strip(b"\0 ") or b"0", 8))
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        kind = header[156:157]
        start = offset + _BLOCK
        body = view[start:start + size]
        if len(body) != size:
            raise ValueError(f"member at byte {offset} runs past the end of the sample")
        offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
        if kind == b"x":  # PAX extended header: applies to the next member
            long_name = _pax_path(bytes(body)) or long_name
        elif kind == b"L":  # GNU long name
            long_name = bytes(body).rstrip(b"\0").decode()
        elif kind in (b"0", b"\0"):
            name = long_name or _ustar_name(header)
            members.append((name, start, size))
            long_name = None
        elif kind != b"g":
            raise ValueError(f"unexpected tar member type {kind!r} at byte {offset}")
    if offset < len(data) and view[offset:] != bytes(len(data) - offset):
        raise ValueError(f"{len(data) - offset} bytes after the last whole member: the sample is cut short")
    _check_sums(data, headers, checksums)
    return members


def _check_sums(data: bytes | bytearray, offsets: list[int], checksums: list[int]) -> None:
    """Each header's checksum (the sum of its bytes, its checksum field counted as spaces). A span is whole
    512-byte blocks, so all its blocks are summed in one numpy call: header by header in Python took a
    fifth of the time of reading a sample."""
    if len(data) % _BLOCK:
        sums = [sum(data[o:o + _BLOCK]) - sum(data[o + 148:o + 156]) + 256 for o in offsets]
    else:
        blocks = np.frombuffer(data, dtype=np.uint8).reshape(-1, _BLOCK)
        rows = np.asarray(offsets) // _BLOCK
        sums = (blocks.sum(axis=1, dtype=np.int64)[rows] - blocks[rows, 148:156].sum(axis=1, dtype=np.int64)
                + 256).tolist()
    for offset, got, want in zip(offsets, sums, checksums, strict=True):
        if got != want:
            raise ValueError(f"bad tar header checksum at byte {offset}")


BLOCK = _BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_path(body: bytes) -> str | None:
    """The ``path`` record of a PAX header ("<length> path=<value>\\n" records)."""
    position = 0
    while position < len(body):
        space = body.index(b" ", position)
        length = int(body[position:space])
        key, _, value = body[space + 1:position + length - 1].partition(b"=")
        if key == b"path":
            return value.decode()
        position += length
    return None
