"""Finding a data set's local clips and images by the names downloaders give them.

Published clip lists (VGGSound, AudioSet, AudioCaps) name a YouTube id and a start time, not a
file; every download script names the file its own way. ``MediaIndex`` walks the media folder
once (recursively) and looks a clip up under the usual names, in this order, with any of
``AUDIO_SUFFIXES`` / ``VIDEO_SUFFIXES``:

- ``{ytid}_{start:06d}`` (VGGSound's released clips, e.g. ``---g-f_I2yQ_000001.mp4``);
- ``{ytid}_{start_ms}_{end_ms}`` (AudioSet downloaders, e.g. ``abc_30000_40000.wav``);
- ``{ytid}_{start:g}_{end:g}`` / ``{ytid}_{start:.3f}_{end:.3f}`` (seconds, as in the CSVs);
- ``{ytid}_{start}`` (start in whole seconds, no padding);
- ``Y{ytid}`` (PANNs / AudioSet-tagging downloads) and ``{ytid}``.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmfuse.core.errors import DataError

AUDIO_SUFFIXES = (".wav", ".flac")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
MEDIA_SUFFIXES = AUDIO_SUFFIXES + VIDEO_SUFFIXES


def clip_stems(ytid: str, start: float, end: float | None = None) -> list[str]:
    """The file names (without suffix) a clip may have, most specific first."""
    stems = [f"{ytid}_{int(start):06d}"]
    if end is not None:
        stems += [f"{ytid}_{round(start * 1000)}_{round(end * 1000)}", f"{ytid}_{start:g}_{end:g}",
                  f"{ytid}_{start:.3f}_{end:.3f}"]
    stems += [f"{ytid}_{int(start)}", f"Y{ytid}", ytid]
    return list(dict.fromkeys(stems))


class MediaIndex:
    """File stem (and name) -> path of every media file under ``root``, built by one walk."""

    def __init__(self, root: Path, suffixes: tuple[str, ...] = MEDIA_SUFFIXES) -> None:
        if not root.is_dir():
            raise DataError(f"media folder not found: {root}")
        self.root = root
        self.by_stem: dict[str, Path] = {}
        self.by_name: dict[str, Path] = {}
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                path = Path(folder) / name
                if path.suffix.lower() in suffixes:
                    self.by_stem.setdefault(path.stem, path)
                    self.by_name.setdefault(name, path)

    def find(self, stems: list[str]) -> Path | None:
        """The first file whose stem is one of ``stems``, or None."""
        for stem in stems:
            if stem in self.by_stem:
                return self.by_stem[stem]
        return None

    def __len__(self) -> int:
        return len(self.by_stem)


def media_column(path: Path) -> str:
    """``audio`` for an audio file, ``video`` for a video file (its own modality column)."""
    return "audio" if path.suffix.lower() in AUDIO_SUFFIXES else "video"
