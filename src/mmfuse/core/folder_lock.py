"""One writer per folder: a run folder or a pack folder is locked while a process writes it.

Two ``mmfuse train`` processes pointed at one run folder (a command started twice, ``--resume`` while
the first still runs) used to both write it, interleaving checkpoints and logs, until one died in
Lightning's CSV logger with a traceback. Now the second is refused in one line that names the
process holding the folder.

The lock is an OS file lock (``filelock``: ``flock`` on POSIX, ``LockFileEx`` on Windows) on
``.mmfuse.lock`` in the folder, so it is released by the kernel when its holder exits, however it
exits (kill -9 included): there is never a stale lock to delete by hand. The holder writes who it
is (pid, host, command, start time) into the file for the refusal message and empties it when
done; the empty file stays behind (removing it would race with a process opening it). On network
file systems without working locks (some NFS setups) filelock falls back to its own marker, which
still refuses a second writer on the same machine.

Parts of one pack (``mmfuse data pack --shard-index I --shard-count N``) write one folder at once, so
each holds a lock of its own (``.mmfuse.part-I-of-N.lock``, ``folder_lock(..., name=...)``) instead of
the folder's; whoever needs the folder alone (finalizing, a whole pack) takes the folder's lock and
then asks ``lock_holder`` whether any part's is held, and a part asks the same of the folder's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from mmfuse.core.errors import MMFuseError

LOCK_FILE = ".mmfuse.lock"
PART_LOCKS = ".mmfuse.part-*.lock"


def part_lock_name(index: int, count: int) -> str:
    """The lock file of part ``index`` of ``count`` of a pack written in parts."""
    return f".mmfuse.part-{index}-of-{count}.lock"


class FolderBusy(MMFuseError):
    """Another process is writing the folder."""


def _holder(path: Path) -> str:
    try:
        owner = json.loads(path.read_text())
        return (f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: "
                f"{' '.join(owner['command'])[:120]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, name: str = LOCK_FILE) -> Iterator[None]:
    """Holds ``folder``'s lock (or the lock file ``name`` in it) while the block runs (``what``: the work,
    for the refusal message). Re-entrant within a process (a train that packs its data first takes both)."""
    if folder.exists() and not folder.is_dir():
        raise MMFuseError(f"{folder} is a file, not a folder ({what} needs a folder)")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    lock = FileLock(path, timeout=0, is_singleton=True, on_acquired=_write_owner)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusy(f"{folder} is being written by {_holder(path)}; wait for it to finish or use another "
                         f"folder ({what} refused)") from None
    try:
        yield
    finally:
        if lock.lock_counter == 1:  # the outermost holder: who held it is no one's business once it is free
            with contextlib.suppress(OSError):
                os.truncate(path, 0)
        lock.release()


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file ``path`` in another process, in words; None when no one does. Found by trying
    it (and letting go at once), so a holder killed with kill -9 holds nothing."""
    if not path.is_file():
        return None
    probe = FileLock(path, timeout=0, is_singleton=False)
    try:
        probe.acquire()
    except Timeout:
        return _holder(path)
    probe.release()
    return None


def held_parts(folder: Path) -> list[str]:
    """The parts writing ``folder`` now (``part I of N: holder``), from their locks."""
    held = []
    for path in sorted(folder.glob(PART_LOCKS)) if folder.is_dir() else []:
        holder = lock_holder(path)
        if holder is not None:
            part = path.name.removeprefix(".mmfuse.part-").removesuffix(".lock").replace("-of-", " of ")
            held.append(f"part {part}: {holder}")
    return held


def _write_owner(fd: int) -> None:
    """Who holds the lock, written into the locked file itself (no second file to go stale)."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv,
             "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
