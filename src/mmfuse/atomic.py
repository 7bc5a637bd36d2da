"""Folders that appear complete or not at all.

A saved model or a built data set is written into a temporary sibling folder and renamed into
place only when every file is there, so a crash, a full disk or Ctrl-C can never leave a
half-written folder that a later run would trust. An existing folder is swapped out in the same
way, so the path always holds either the old complete folder or the new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``final``; it becomes ``final`` when the block succeeds.

    On an exception the temporary folder is deleted and ``final`` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            backup = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
            os.replace(staging, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
