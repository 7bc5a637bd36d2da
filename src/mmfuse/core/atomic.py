"""Files and folders that appear complete or not at all.

A saved model, a built data set, a cache entry or a results table is written under a temporary
name beside its final path and renamed into place only when complete, so a crash, a full disk or
Ctrl-C can never leave a half-written file that a later run would trust. Every writer in mmfuse
goes through these helpers; none renames by hand.

Temporary names carry the writer's host name and process id (``.<name>.tmp-<pid>@<host>-<random>``),
so the leftovers of a killed writer are recognised and removed by the next writer of the same path.
Only this host's leftovers: on a disk that several machines share (NFS, Lustre: parts of one pack
written from a SLURM array) a process id means nothing on another machine, and one machine must never
delete another's file in flight. Names from before hosts were recorded (``.<name>.tmp-<pid>-<random>``)
count as this host's, as they always did. What lands gets the permissions the user's umask
gives a newly created file or folder (``mkstemp``/``mkdtemp`` alone would give 0600/0700).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def host_tag() -> str:
    """This machine's name as it appears in temporary names: no ``-`` or ``/`` (they delimit the name)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def _writer_tag() -> str:
    """``<pid>@<host>-``: what a temporary's name says about the process writing it."""
    return f"{os.getpid()}@{host_tag()}-"


def _writer(name: str) -> tuple[int, str | None] | None:
    """(pid, host) of a temporary's name after its prefix; host None for names from before hosts were
    recorded; None when the name is not one of ours."""
    head = name.split("-", 1)[0]
    pid_text, at, host = head.partition("@")
    if not pid_text.isdigit():
        return None
    return int(pid_text), (host if at else None)


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Deletes temporaries of ``final`` left by writers on this host that no longer run; returns what it
    removed. Another host's temporaries are never touched (see the module docstring)."""
    removed: list[Path] = []
    prefix = _temp_prefix(final)
    if not final.parent.is_dir():
        return removed
    here = host_tag()
    for leftover in final.parent.glob(f"{prefix}*"):
        writer = _writer(leftover.name[len(prefix):])
        if writer is None or writer[1] not in (None, here):  # another machine's: its pid says nothing here
            continue
        if writer[0] == os.getpid() or _pid_alive(writer[0]):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _apply_umask(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextmanager
def atomic_file(final: Path | str) -> Iterator[Path]:
    """Yields a temporary path beside ``final``; it becomes ``final`` when the block succeeds.

    The block writes the temporary path (any writer: ``np.save``, ``save_file``, faiss...). On an
    exception it is deleted and ``final`` keeps whatever it held before.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, name = tempfile.mkstemp(prefix=f"{_temp_prefix(final)}{_writer_tag()}", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _apply_umask(tmp, is_dir=False)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: Path | str, text: str) -> Path:
    """Writes ``text`` to ``final`` through ``atomic_file``."""
    with atomic_file(final) as tmp:
        tmp.write_text(text)
    return Path(final)


@contextmanager
def staged_folder(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``final``; it becomes ``final`` when the block succeeds.

    On an exception the temporary folder is deleted and ``final`` is left untouched. An existing
    ``final`` is swapped out, so the path always holds the old complete folder or the new one;
    with ``keep_existing`` (content-addressed caches) a ``final`` that appeared meanwhile, written
    by a concurrent process, wins and the new copy is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    staging = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(final)}{_writer_tag()}", dir=final.parent))
    try:
        yield staging
        _apply_umask(staging, is_dir=True)
        if final.exists() and keep_existing:
            return
        if final.exists():
            backup = final.with_name(f"{_temp_prefix(final)}{_writer_tag()}old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
            os.replace(staging, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.replace(staging, final)
            if not final.exists():
                raise OSError(f"{final}: could not move the finished folder into place")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
