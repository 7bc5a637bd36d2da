"""Is a pack whole? Each shard against the digests of its index, named in words when it is not.

``mmfuse data verify`` (``verify_pack``) and ``mmfuse data pack`` on a finished pack (which repacks
the shards ``shard_damage`` names) share these; the digests themselves are
``mmfuse.data.pack_integrity``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfuse.core.errors import DataError
from mmfuse.data.pack_format import INDEX_SUFFIX, MAX_INDEX_BYTES, ShardIndex, checked_shards
from mmfuse.data.pack_integrity import REPAIR_HINT, verify_shard

PACK_FILE = "pack.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``; None when it is missing, unreadable, not an object or too large to be ours."""
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            return None
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def shard_damage(folder: Path, name: str, use_cache: bool = True) -> str | None:
    """Why the shard ``name`` in ``folder`` is not whole (missing, unreadable index, damaged bytes), or None."""
    path = folder / name
    index_path = path.with_name(path.name + INDEX_SUFFIX)
    if not index_path.is_file():
        return f"{name}: no index (an unfinished shard)" if path.exists() else f"{name}: missing"
    try:
        verify_shard(path, ShardIndex.read(index_path), name, use_cache=use_cache)
    except DataError as exc:
        return str(exc).removesuffix(REPAIR_HINT)
    return None


@dataclass
class VerifyResult:
    """What ``verify_pack`` found: shards checked and, per damaged shard, why (in words)."""

    folder: Path
    shards: int
    damaged: dict[str, str]


def verify_pack(folder: Path) -> VerifyResult:
    """Hashes every shard of the finished pack in ``folder`` (no cache: this is the check that trusts
    nothing) and compares it, and each damaged shard's members, with the digests in its index."""
    folder = Path(folder)
    saved = read_json(folder / PACK_FILE)
    if saved is None:
        raise DataError(f"{folder} is not a finished pack: no readable {PACK_FILE}")
    names = [name for split in checked_shards(saved.get("shards"), str(folder / PACK_FILE)).values() for name in split]
    damaged = {name: why for name in names if (why := shard_damage(folder, name, use_cache=False)) is not None}
    return VerifyResult(folder, len(names), damaged)
