"""Where mmfuse caches derived data, and what is there: the root of ``mmfuse cache list | prune``.

Every cache lives under one folder, ``$MMFUSE_CACHE`` or ``~/.cache/mmfuse``, one sub-folder per kind
(``arrays``: in-memory splits, ``features``: frozen encoders' outputs, ``synth``: generated data
sets, ``verified``: which pack shards were hashed and found whole). Each entry is keyed by the
content it was made from, so a changed setting writes a new one and nothing ever removes the old:
without a way to see and prune them, every audio setting tried leaves its copy of the data set behind.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("arrays", "features", "synth", "verified")


def cache_home() -> Path:
    """``$MMFUSE_CACHE`` when set, else ``~/.cache/mmfuse``."""
    env = os.environ.get("MMFUSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmfuse"


def cache_dir(kind: str) -> Path:
    """The default folder of one kind of cache (a config may point a run elsewhere)."""
    return cache_home() / kind


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    path: Path
    size_bytes: int
    files: int
    newest: float
    """The latest modification time of anything in it (seconds since the epoch)."""

    @property
    def age_days(self) -> float:
        return max(0.0, (time.time() - self.newest) / 86400)


def cache_entries(home: Path | None = None) -> list[CacheEntry]:
    """Every entry (a file or folder directly inside a kind's folder), by kind then name."""
    home = cache_home() if home is None else home
    entries = []
    for kind in KINDS:
        folder = home / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            entries.append(_measure(kind, path))
    return entries


def _measure(kind: str, path: Path) -> CacheEntry:
    if not path.is_dir() or path.is_symlink():
        stat = path.lstat()
        return CacheEntry(kind, path, stat.st_size, 1, stat.st_mtime)
    size, files, newest = 0, 0, path.lstat().st_mtime
    for root, _, names in os.walk(path):
        for name in names:
            try:
                stat = (Path(root) / name).lstat()
            except FileNotFoundError:  # removed by a concurrent prune or writer
                continue
            size, files, newest = size + stat.st_size, files + 1, max(newest, stat.st_mtime)
    return CacheEntry(kind, path, size, files, newest)


def remove_entry(entry: CacheEntry) -> None:
    """Deletes one entry. A run that has it open keeps reading it (POSIX keeps unlinked files alive);
    the next run that needs it builds it again."""
    if entry.path.is_dir() and not entry.path.is_symlink():
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        entry.path.unlink(missing_ok=True)
