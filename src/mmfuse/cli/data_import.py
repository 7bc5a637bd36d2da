"""``mmfuse data import FORMAT SOURCE --out DIR``: a published data set -> an mmfuse manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mmfuse.cli.app import console, data_app, friendly_errors

_FORMATS_HELP = ("mmsa, coco-captions, vggsound, audioset-csv, audiocaps, clotho, iemocap, hf-datasets "
                 "(README: 'Bring your data set')")


@data_app.command("import")
@friendly_errors
def data_import(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help=_FORMATS_HELP)],
    source: Annotated[Path, typer.Argument(help="The data set's file or folder, in its published layout.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (manifest, arrays, report, config).")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    limit: Annotated[int | None, typer.Option(help="At most N rows per split (a quick try).")] = None,
    on_error: Annotated[str, typer.Option(help="raise: stop at an unreadable row; skip: count it.")] = "raise",
    images: Annotated[Path | None, typer.Option(help="coco-captions: the images folder.")] = None,
    karpathy: Annotated[Path | None, typer.Option(help="coco-captions: dataset_coco.json (Karpathy splits).")] = None,
    media: Annotated[Path | None, typer.Option(help="vggsound/audioset-csv/audiocaps/clotho: clips folder.")] = None,
    class_labels: Annotated[Path | None, typer.Option(
        help="audioset-csv: class_labels_indices.csv (mids -> names).")] = None,
    all_classes: Annotated[bool, typer.Option(help="iemocap: every emotion, not the 4-class setup.")] = False,
    test_session: Annotated[int, typer.Option(help="iemocap: the session that is the test split.")] = 5,
    text_column: Annotated[str | None, typer.Option(help="hf-datasets: the text column.")] = None,
    label_column: Annotated[str | None, typer.Option(help="hf-datasets: the label column.")] = None,
    image_column: Annotated[str | None, typer.Option(help="hf-datasets: the Image column.")] = None,
    audio_column: Annotated[str | None, typer.Option(help="hf-datasets: the Audio column.")] = None,
) -> None:
    """Import a published data set: writes manifest.jsonl, import_report.json and (when it can) config.yaml."""
    from mmfuse.core.errors import ConfigError
    from mmfuse.datasets.importers import ImportOptions, run_import

    if on_error not in ("raise", "skip"):
        raise ConfigError(f"--on-error must be raise or skip, got '{on_error}'")
    options = ImportOptions(limit=limit, on_error=on_error,  # type: ignore[arg-type]
                            images=images, karpathy=karpathy, media=media, class_labels=class_labels,
                            all_classes=all_classes, test_session=test_session, text_column=text_column,
                            label_column=label_column, image_column=image_column, audio_column=audio_column)
    started = time.perf_counter()
    report = run_import(fmt, source, out, options, overwrite=overwrite)
    for line in report.summary_lines():
        console.print(line, highlight=False)
    console.print(f"wrote [bold]{report.manifest}[/] in {time.perf_counter() - started:.1f} s "
                  f"(report: import_report.json)", highlight=False)
    if report.config:
        console.print(f"train with: mmfuse train -c {report.config}", highlight=False)
