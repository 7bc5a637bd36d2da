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
and a reader fetches a sample with one positioned read, without scanning the shard.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfuse.core.errors import DataError
from mmfuse.data.dataset import Sample

FORMAT = "mmfuse-pack-v1"
INDEX_SUFFIX = ".index.json"
_DTYPES = {"bool", "int64", "int32", "float32", "float64", "float16", "uint8", "int16"}


@dataclass
class ShardIndex:
    """What a finished shard holds: its size, one (start, end) byte span per sample, skipped rows."""

    name: str
    bytes: int
    spans: list[tuple[int, int]]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "name": self.name, "bytes": self.bytes,
                           "spans": [list(s) for s in self.spans], "skipped": self.skipped})

    @classmethod
    def read(cls, path: Path) -> ShardIndex:
        try:
            state = json.loads(path.read_text())
            return cls(state["name"], int(state["bytes"]), [(int(a), int(b)) for a, b in state["spans"]],
                       list(state["skipped"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: unreadable shard index ({exc})") from None


def _npy(tensor: torch.Tensor) -> bytes:
    array = tensor.detach().cpu().numpy()
    if str(array.dtype) not in _DTYPES:
        raise DataError(f"cannot pack a tensor of dtype {array.dtype}")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)  # not ascontiguousarray: it turns a 0-d array into 1-d
    return buffer.getvalue()


def sample_members(key: str, sample: Sample) -> dict[str, Any]:
    """One sample as WebDataset members: the ``__key__``, a JSON header and one ``.npy`` per tensor."""
    header = {"id": sample.id, "target": sample.target is not None,
              "inputs": {m: None if v is None else sorted(v) for m, v in sorted(sample.inputs.items())}}
    members: dict[str, Any] = {"__key__": key, "json": json.dumps(header, sort_keys=True).encode()}
    for modality, tensors in sample.inputs.items():
        for name, tensor in (tensors or {}).items():
            members[f"{modality}.{name}.npy"] = _npy(tensor)
    if sample.target is not None:
        members["target.npy"] = _npy(sample.target)
    return members


def write_shard(path: Path, samples: list[Sample], first_key: int) -> list[tuple[int, int]]:
    """Writes ``samples`` as one tar at ``path`` (keys from ``first_key``); returns each sample's byte span."""
    import webdataset as wds

    with open(path, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=0.0, user="mmfuse",
                                                   group="mmfuse", mode=0o444) as writer:
        for offset, sample in enumerate(samples):
            writer.write(sample_members(f"{first_key + offset:010d}", sample))
    return _spans(path)


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


def decode_sample(data: bytes, where: str) -> Sample:
    """The bytes of one sample's span -> ``Sample``; arrays are read with ``allow_pickle=False``."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                extracted = tar.extractfile(info)
                assert extracted is not None
                members[info.name.split(".", 1)[1]] = extracted.read()
    except (tarfile.TarError, IndexError, EOFError) as exc:
        raise DataError(f"{where}: corrupt sample in the pack ({type(exc).__name__}: {exc})") from None
    return sample_from_members(members, where)


def sample_from_members(members: dict[str, Any], where: str) -> Sample:
    """One sample's members (name after the key -> bytes, as WebDataset yields them) -> ``Sample``."""
    try:
        header = json.loads(members["json"])
        inputs: dict[str, dict[str, torch.Tensor] | None] = {}
        for modality, names in header["inputs"].items():
            inputs[modality] = None if names is None else {n: _load(members[f"{modality}.{n}.npy"]) for n in names}
        target = _load(members["target.npy"]) if header["target"] else None
    except (KeyError, ValueError, TypeError, EOFError) as exc:
        raise DataError(f"{where}: corrupt sample in the pack ({type(exc).__name__}: {exc})") from None
    return Sample(str(header["id"]), inputs, target)


def _load(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
