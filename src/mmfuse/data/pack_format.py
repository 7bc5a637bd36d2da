"""The shard format of a pack (``mmfuse data pack``): WebDataset tar files of ``.npy`` and ``.json`` members.

Why WebDataset's format: a shard is a plain POSIX tar (readable by ``tar``, by ``webdataset.WebDataset``
and by any language), its members are ``.npy`` arrays and JSON, so nothing in a pack is ever unpickled
(LitData, the other candidate, falls back to pickling any leaf type it does not know, and its chunks
are readable only through LitData). Shards are written with ``webdataset.TarWriter`` with a fixed
mtime, user and mode, so the same samples always give the same bytes (a resumed pack equals an
uninterrupted one byte for byte).

A sample with key ``K`` is the members ``K.json`` (``{"id": ..., "inputs": {modality: [names] | null},
"target": bool}``), ``K.<modality>.<name>.npy`` per input tensor and ``K.target.npy``. Its members are
contiguous in the tar, so the shard's index (``<shard>.index.json``) keeps one byte span per sample
and a reader fetches a sample with one positioned read, without scanning the shard; the index also
keeps where each member's bytes lie in that span, so the reader slices them out without parsing the
tar headers (WebDataset and ``tar`` read the same shard as any tar).
"""

from __future__ import annotations

import builtins
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfuse.core.errors import DataError
from mmfuse.data.dataset import Sample
from mmfuse.data.pack_compact import Compactor, decompress, restore
from mmfuse.data.pack_tar import BLOCK, span_layout, span_members

FORMAT = "mmfuse-pack-v2"
READABLE_FORMATS = ("mmfuse-pack-v1", FORMAT)
"""v2 adds compact members (``mmfuse.data.pack_compact``); a v1 pack (plain ``.npy`` members) reads as before."""
INDEX_SUFFIX = ".index.json"
__all__ = ["BLOCK", "FORMAT", "INDEX_SUFFIX", "READABLE_FORMATS", "ShardIndex", "decode_sample", "sample_members",
           "shard_layouts", "span_layout", "span_members", "write_shard"]
_DTYPES = {"bool", "int64", "int32", "float32", "float64", "float16", "uint8", "int16"}


SPLITS = ("train", "val", "test")


def shard_name(split: str, number: int) -> str:
    """The pack's naming scheme: ``<split>-NNNNN.tar``."""
    return f"{split}-{number:05d}.tar"


def checked_shards(shards: Any, where: str) -> dict[str, list[str]]:
    """``pack.json``'s ``shards`` (split -> shard names), refused in one line unless every split is one
    of ``SPLITS`` and its names are exactly ``<split>-00000.tar``, ``<split>-00001.tar``... in order.

    Why so strict: the names are joined to the pack's location to open files and URLs, and whoever
    can write a pack (a shared bucket) writes its pack.json; a name that is anything but the scheme
    (``../``, ``?``, ``;``, a space) is refused before anything is opened.
    """
    if not isinstance(shards, dict):
        raise DataError(f"{where}: 'shards' is not a mapping of split to shard names")
    checked: dict[str, list[str]] = {}
    for split, names in shards.items():
        if split not in SPLITS:
            raise DataError(f"{where}: {str(split)[:80]!r} is not a split of a pack (expected {', '.join(SPLITS)})")
        if not isinstance(names, list):
            raise DataError(f"{where}: the shards of split '{split}' are not a list of names")
        for number, name in enumerate(names):
            if name != shard_name(split, number):
                raise DataError(f"{where}: shard name {str(name)[:80]!r} is not the pack's own "
                                f"'{shard_name(split, number)}'; refusing the pack")
        checked[split] = list(names)
    return checked


MAX_INDEX_BYTES = 256 * 1024 * 1024
"""Largest shard index (or ``pack.json``) read: an index takes ~200 bytes per sample, so this is
more than a million samples per shard, and a hostile file cannot ask for more memory than this."""

_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass
class ShardIndex:
    """What a finished shard holds: its size, one (start, end) byte span per sample, skipped rows, per
    sample its members' (name, data offset within the span, size) so a reader slices them out without
    parsing tar headers (``layouts``), and the digests that prove the shard's bytes: ``sha256`` of the
    whole file and, per sample, a short digest of each member's blocks (``members``, in layout order;
    see ``mmfuse.data.pack_integrity``), which name the damaged member when the shard's digest differs.
    ``first_key`` is the key of the shard's first sample, so a member is named as in the tar."""

    name: str
    bytes: int
    spans: list[tuple[int, int]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    layouts: list[Layout] | None = None
    sha256: str | None = None
    members: list[list[str]] | None = None
    first_key: int = 0

    def to_json(self) -> str:
        state: dict[str, Any] = {"format": FORMAT, "name": self.name, "bytes": self.bytes,
                                 "spans": [list(s) for s in self.spans], "skipped": self.skipped}
        if self.layouts is not None:
            state["layouts"] = [[list(member) for member in layout] for layout in self.layouts]
        if self.sha256 is not None:
            state.update(sha256=self.sha256, members=self.members, first_key=self.first_key)
        return json.dumps(state)

    @classmethod
    def read(cls, path: Path) -> ShardIndex:
        """The index at ``path``, checked to describe a shard that could exist (see ``parse``)."""
        try:
            if path.stat().st_size > MAX_INDEX_BYTES:
                raise ValueError(f"{path.stat().st_size:,} bytes, more than an index can be ({MAX_INDEX_BYTES:,})")
            return cls.parse(path.read_bytes(), str(path))
        except OSError as exc:
            raise DataError(f"{path}: unreadable shard index ({exc})") from None
        except ValueError as exc:
            raise DataError(f"{path}: unreadable shard index ({exc})") from None

    @classmethod
    def parse(cls, data: builtins.bytes, where: str) -> ShardIndex:  # (the field ``bytes`` shadows the type)
        """An index from its JSON bytes; a ``DataError`` naming ``where`` unless every span lies inside the
        shard, in order, and every member inside its span: the spans and sizes size the reads, so a
        hostile index must not be able to ask for memory or bytes the shard does not have."""
        try:
            state = json.loads(data)
            layouts = state.get("layouts")
            index = cls(str(state["name"]), int(state["bytes"]), [(int(a), int(b)) for a, b in state["spans"]],
                        list(state["skipped"]),
                        None if layouts is None else [tuple((str(n), int(o), int(z)) for n, o, z in layout)
                                                      for layout in layouts],
                        None if state.get("sha256") is None else str(state["sha256"]),
                        None if state.get("members") is None else [[str(d) for d in row] for row in state["members"]],
                        int(state.get("first_key", 0)))
            index.check()
        except (ValueError, KeyError, TypeError, OverflowError, AttributeError) as exc:  # Infinity, a list for a dict
            raise DataError(f"{where}: unreadable shard index ({type(exc).__name__}: {exc})") from None
        return index

    def check(self) -> None:
        """ValueError unless the index is self-consistent (see ``parse``)."""
        if self.bytes < 0 or self.first_key < 0:
            raise ValueError("negative size or key")
        previous = 0
        for start, end in self.spans:
            if not previous <= start < end <= self.bytes:
                raise ValueError(f"sample span {start}-{end} is not inside the shard's {self.bytes} bytes in order")
            previous = end
        if self.layouts is not None:
            if len(self.layouts) != len(self.spans):
                raise ValueError(f"{len(self.layouts)} member layouts for {len(self.spans)} samples")
            for (start, end), layout in zip(self.spans, self.layouts, strict=True):
                if any(offset < 0 or size < 0 or offset + size > end - start for _, offset, size in layout):
                    raise ValueError(f"a member of the sample at bytes {start}-{end} lies outside it")
        if self.sha256 is not None:
            if len(self.sha256) != 64 or not _HEX.match(self.sha256):
                raise ValueError("sha256 is not a SHA-256 hex digest")
            if self.layouts is None or self.members is None or len(self.members) != len(self.layouts) \
                    or any(len(row) != len(layout) for row, layout in zip(self.members, self.layouts, strict=True)):
                raise ValueError("member digests do not match the member layouts")
            if any(not _HEX.match(d) for row in self.members for d in row):
                raise ValueError("a member digest is not hex")


Layout = tuple[tuple[str, int, int], ...]
"""One sample's members: (name after the key, data offset within the sample's span, size in bytes)."""


def _npy(tensor: torch.Tensor | np.ndarray) -> bytes:
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor
    if str(array.dtype) not in _DTYPES:
        raise DataError(f"cannot pack a tensor of dtype {array.dtype}")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)  # not ascontiguousarray: it turns a 0-d array into 1-d
    return buffer.getvalue()


def sample_members(key: str, sample: Sample, compactor: Compactor | None = None) -> dict[str, Any]:
    """One sample as WebDataset members: the ``__key__``, a JSON header and one ``.npy`` per tensor (with a
    ``compactor``, stored compactly where that is exact: ``mmfuse.data.pack_compact``)."""
    header: dict[str, Any] = {"id": sample.id, "target": sample.target is not None,
                              "inputs": {m: None if v is None else sorted(v) for m, v in sorted(sample.inputs.items())}}
    members: dict[str, Any] = {"__key__": key}
    tensors = [(f"{m}.{n}", t) for m, named in sample.inputs.items() for n, t in (named or {}).items()]
    tensors += [("target", sample.target)] if sample.target is not None else []
    stored: dict[str, Any] = {}
    for name, tensor in tensors:
        if compactor is None:
            members[f"{name}.npy"] = _npy(tensor)
            continue
        plain = _npy(tensor)
        array, spec = compactor.narrow(tensor.detach().cpu().numpy())
        npy = plain if spec is None else _npy(array)
        packed = compactor.compress(npy)
        body = npy if packed is None else packed
        if -(-len(body) // BLOCK) >= -(-len(plain) // BLOCK):  # tar pads to 512: no block saved, only decode time
            members[f"{name}.npy"] = plain
            continue
        if spec is not None:
            stored[name] = spec
        members[f"{name}.npy" if packed is None else f"{name}.npy.zst"] = body
    if stored:
        header["stored"] = stored
    members["json"] = json.dumps(header, sort_keys=True).encode()
    return members


def write_shard(path: Path, samples: list[Sample], first_key: int,
                compactor: Compactor | None = None) -> list[tuple[int, int]]:
    """Writes ``samples`` as one tar at ``path`` (keys from ``first_key``; members compact with a
    ``compactor``); returns each sample's byte span."""
    import webdataset as wds

    # mtime 0 as an int: a float (0.0) made tarfile add a 1 KiB PAX header to every member ("mtime=0.0"),
    # two thirds of a member's header bytes and a third of a compact shard.
    with open(path, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=0, user="mmfuse",
                                                   group="mmfuse", mode=0o444) as writer:
        for offset, sample in enumerate(samples):
            writer.write(sample_members(f"{first_key + offset:010d}", sample, compactor))
    return _spans(path)


def shard_layouts(path: Path, spans: list[tuple[int, int]]) -> list[Layout]:
    """Each sample's member layout (see ``ShardIndex``), from the written shard's own headers."""
    data = path.read_bytes()
    return [tuple((name.split(".", 1)[1], offset, size) for name, offset, size in span_layout(data[start:end]))
            for start, end in spans]


def _spans(path: Path) -> list[tuple[int, int]]:
    """(first header byte, end of last member's data, padded to a 512-byte block) of each sample."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key = info.name.split(".", 1)[0]
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            span = spans.setdefault(key, [info.offset, end])
            span[1] = end
    return [(a, b) for a, b in spans.values()]


def decode_sample(data: bytes | bytearray, where: str, layout: Layout | None = None) -> Sample:
    """The bytes of one sample's span -> ``Sample``; arrays are read with ``allow_pickle=False``.

    With the sample's ``layout`` from the shard index the members are sliced out directly; without it
    the tar headers are parsed (``span_members``). Given a ``bytearray`` (``PackDataset`` reads into one),
    the tensors are views of it: no copies.
    """
    try:
        view = memoryview(data)
        if layout is not None:
            if any(offset + size > len(data) for _, offset, size in layout):
                raise ValueError("the index's member layout runs past the end of the sample")
            members = {name: view[offset:offset + size] for name, offset, size in layout}
        else:
            members = {name.split(".", 1)[1]: body for name, body in span_members(data)}
    except (ValueError, IndexError) as exc:
        raise DataError(f"{where}: corrupt sample in the pack ({type(exc).__name__}: {exc})") from None
    return sample_from_members(members, where)


def sample_from_members(members: dict[str, Any], where: str) -> Sample:
    """One sample's members (name after the key -> bytes, as WebDataset yields them) -> ``Sample``."""
    try:
        header = json.loads(bytes(members["json"]))
        stored = header.get("stored") or {}
        inputs: dict[str, dict[str, torch.Tensor] | None] = {}
        for modality, names in header["inputs"].items():
            inputs[modality] = None if names is None else {n: _member(members, f"{modality}.{n}", stored)
                                                           for n in names}
        target = _member(members, "target", stored) if header["target"] else None
        sample_id = str(header["id"])
    except (KeyError, ValueError, TypeError, EOFError, IndexError, AttributeError, OverflowError) as exc:
        # Found by fuzzing (tests/test_fuzz_files.py): a header that is not an object (AttributeError),
        # a cut .npy (IndexError), an id-less header (KeyError) all came out as tracebacks.
        raise DataError(f"{where}: corrupt sample in the pack ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    return Sample(sample_id, inputs, target)


def _member(members: dict[str, Any], name: str, stored: dict[str, Any]) -> torch.Tensor:
    """The tensor of member ``name``: a plain ``.npy``, or a compact one read back (``pack_compact``)."""
    if f"{name}.npy" in members:
        tensor = _load(members[f"{name}.npy"])
    else:
        tensor = _load(bytearray(decompress(members[f"{name}.npy.zst"])))
    if name in stored:
        tensor = torch.from_numpy(restore(tensor.numpy(), stored[name]))  # a new array (astype, arithmetic)
    return tensor


def _load(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """One ``.npy`` member -> a tensor, its header parsed once per distinct header.

    ``np.load`` parses every header with ``ast.literal_eval`` (40% of reading a pack's arrays); the
    members of one modality share one header, so the parsed (dtype, shape, order, count) are cached by
    the header's bytes. Object dtypes are refused as ``np.load(allow_pickle=False)`` refuses them.
    A writable buffer (a view of ``PackDataset``'s read) becomes the tensor's storage; read-only bytes
    are copied, since torch tensors must be writable.
    """
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy array")
    width = 2 if data[6] == 1 else 4
    start = 8 + width + int.from_bytes(data[8:8 + width], "little")
    header = bytes(data[:start])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        stream = io.BytesIO(header)
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):  # 3.0 (utf-8 field names): never written by a pack
            return torch.from_numpy(np.load(io.BytesIO(bytes(data)), allow_pickle=False))
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(stream)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed in a pack (they would need pickle)")
        if len(_NPY_HEADERS) >= 256:
            _NPY_HEADERS.clear()
        parsed = _NPY_HEADERS[header] = (shape, fortran_order, dtype, int(np.prod(shape, dtype=np.int64)))
    shape, fortran_order, dtype, count = parsed
    array = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}
