"""``mmfuse data import FORMAT SOURCE --out DIR``: published data sets -> an mmfuse manifest.

One module per format reads the layout the data set is published in (each module's docstring
says which files, keys and shapes, and where that layout is documented) and writes rows through
the shared ``ImportWriter``. This module is the registry: ``IMPORTERS`` maps a format name to
its reader and the options it reads, and ``run_import`` checks the options, stages the output
folder (it appears complete or not at all) and returns the ``ImportReport``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from mmfuse.core.atomic import staged_folder
from mmfuse.core.errors import ConfigError, DataError, did_you_mean
from mmfuse.datasets.importers import audiocaps, audioset, clotho, coco, hf_datasets, iemocap, mmsa, vggsound
from mmfuse.datasets.importers.writer import ImportOptions, ImportReport, ImportWriter

__all__ = ["IMPORTERS", "ImportOptions", "ImportReport", "ImporterSpec", "run_import"]

_COMMON = frozenset({"limit", "on_error"})


@dataclass(frozen=True)
class ImporterSpec:
    """A format: its reader, the options it reads beyond the common ones, one line of help."""

    read: Callable[[Path, ImportWriter], None]
    options: frozenset[str]
    help: str


IMPORTERS: dict[str, ImporterSpec] = {
    "mmsa": ImporterSpec(mmsa.import_mmsa, frozenset(),
                         "MMSA MOSI/MOSEI/SIMS pickle or MultiBench affect pickle -> feature arrays + score"),
    "coco-captions": ImporterSpec(coco.import_coco, frozenset({"images", "karpathy"}),
                                  "COCO captions JSON (+ Karpathy splits) -> image-caption rows"),
    "vggsound": ImporterSpec(vggsound.import_vggsound, frozenset({"media"}),
                             "vggsound.csv + local clips -> label rows"),
    "audioset-csv": ImporterSpec(audioset.import_audioset, frozenset({"media", "class_labels"}),
                                 "AudioSet segment CSVs + local clips -> multi-label rows"),
    "audiocaps": ImporterSpec(audiocaps.import_audiocaps, frozenset({"media"}),
                              "AudioCaps train/val/test.csv + local audio -> audio-caption rows"),
    "clotho": ImporterSpec(clotho.import_clotho, frozenset({"media"}),
                           "Clotho caption CSVs + audio folders -> audio-caption rows"),
    "iemocap": ImporterSpec(iemocap.import_iemocap, frozenset({"all_classes", "test_session"}),
                            "IEMOCAP sessions -> text + audio + emotion rows (4 classes by default)"),
    "hf-datasets": ImporterSpec(hf_datasets.import_hf, frozenset({"text_column", "label_column", "image_column",
                                                                  "audio_column"}),
                                "save_to_disk folder or Parquet files -> rows + media files"),
}


def _check_options(fmt: str, options: ImportOptions) -> None:
    """An option the format does not read is an error, not silently ignored."""
    spec = IMPORTERS[fmt]
    defaults = ImportOptions()
    for option in fields(ImportOptions):
        name = option.name
        if name in _COMMON or name in spec.options:
            continue
        if getattr(options, name) != getattr(defaults, name):
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to format '{fmt}'"
                              + (f" (it reads: {', '.join('--' + o.replace('_', '-') for o in sorted(spec.options))})"
                                 if spec.options else ""))
    if options.limit is not None and options.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {options.limit}")


def run_import(fmt: str, source: Path, out: Path, options: ImportOptions | None = None,
               overwrite: bool = False) -> ImportReport:
    """Imports ``source`` (format ``fmt``) into ``out``; ``out`` must be absent or empty unless ``overwrite``."""
    if fmt not in IMPORTERS:
        raise ConfigError(f"unknown import format '{fmt}'{did_you_mean(fmt, IMPORTERS)}; "
                          f"choose from {', '.join(IMPORTERS)}")
    options = options or ImportOptions()
    _check_options(fmt, options)
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError(f"source not found: {source}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"output folder {out} is not empty; choose another --out or pass --overwrite")
    with staged_folder(out) as staging:
        writer = ImportWriter(staging, fmt, source, options)
        IMPORTERS[fmt].read(source, writer)
        return writer.finish(out)
