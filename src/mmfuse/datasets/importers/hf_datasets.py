"""A local Hugging Face ``datasets`` folder or Parquet files -> rows + media files.

Layouts followed (read with pyarrow alone; the ``datasets`` package is not needed):

- ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (datasets ``arrow_dataset.py`` /
  ``dataset_dict.py``): a DatasetDict folder has ``dataset_dict.json`` (``{"splits": [...]}``)
  and one folder per split; a split (or single Dataset) folder has ``state.json``
  (``"_data_files": [{"filename": "data-00000-of-00001.arrow"}]``, ``"_split"``), ``dataset_info.json``
  (``"features"``) and the Arrow *stream* files.
- Parquet (the Hub's ``data/train-00000-of-00001.parquet``, or ``<split>/*.parquet``): the split
  is the parent folder name or the file name's part before the first ``-``; the features are in
  the schema metadata ``huggingface`` -> ``info.features``.

Feature types: ``Image`` is a struct ``{bytes, path}``; ``Audio`` is ``{bytes, path}`` (or, in
decoded form, ``{array, sampling_rate, path}``); ``ClassLabel`` stores an int (``-1`` = no label)
whose names come from the features. Image and audio bytes are written to
``media/<split>/<row>.<ext>`` (the extension from the stored path or the bytes' signature; a
decoded audio array becomes a .wav) and rows point at them; a value with only a ``path`` is
resolved against the source folder. Columns: ``--image-column`` / ``--audio-column`` /
``--text-column`` / ``--label-column``, else detected (the feature types first, then the usual
names: image, audio, text/sentence/caption..., label/labels/target...). Splits ``validation`` /
``valid`` become ``val``. Row ids: an ``id`` column (an integer one prefixed with the split, since
those restart at 0 per split), else ``<split>-<row>``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.writer import ImportWriter

SPLIT_NAMES = {"validation": "val", "valid": "val", "dev": "val"}
TEXT_NAMES = ("text", "sentence", "caption", "question", "utterance", "transcription", "content", "review", "title")
LABEL_NAMES = ("label", "labels", "target", "class", "category", "emotion", "sentiment")
_SIGNATURES = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
               (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"))


@dataclass
class _Part:
    """One split's files and the features ``dataset_info`` declares for them."""

    split: str
    files: list[Path]
    features: dict[str, Any] = field(default_factory=dict)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _saved_split(folder: Path, split: str) -> _Part:
    state = _json(folder / "state.json")
    files = [folder / entry["filename"] for entry in state.get("_data_files", [])]
    info = folder / "dataset_info.json"
    features = _json(info).get("features") or {} if info.is_file() else {}
    return _Part(SPLIT_NAMES.get(split, split), files, features)


def _parts(source: Path) -> list[_Part]:
    if (source / "dataset_dict.json").is_file():
        splits = _json(source / "dataset_dict.json").get("splits", [])
        return [_saved_split(source / split, split) for split in splits]
    if (source / "state.json").is_file():  # one Dataset: its own split name, else train
        return [_saved_split(source, str(_json(source / "state.json").get("_split") or "train"))]
    files = sorted(source.rglob("*.parquet")) if source.is_dir() else [source]
    if not files or any(f.suffix != ".parquet" for f in files):
        raise DataError(f"{source}: not a save_to_disk folder (dataset_dict.json / state.json) or Parquet files")
    parts: dict[str, _Part] = {}
    for path in files:
        parent = path.parent.name
        split = parent if parent in ("train", "test", "val", *SPLIT_NAMES) else path.stem.split("-")[0]
        split = SPLIT_NAMES.get(split, split)
        part = parts.setdefault(split, _Part(split, []))
        part.files.append(path)
        if not part.features:
            meta = (pq.read_schema(path).metadata or {}).get(b"huggingface")
            if meta:
                part.features = (json.loads(meta).get("info") or {}).get("features") or {}
    return list(parts.values())


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    """Record batches of one .arrow (stream or file format) or .parquet file."""
    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=256)
            return
        with pa.memory_map(str(path)) as source:
            try:
                reader: Any = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
                return
            yield from reader
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _type(features: dict[str, Any], column: str) -> str:
    feature = features.get(column)
    return str(feature.get("_type", "")) if isinstance(feature, dict) else ""


def _pick(kind: str, option: str | None, schema: pa.Schema, features: dict[str, Any], names: tuple[str, ...],
          where: Path) -> str | None:
    columns = schema.names
    if option is not None:
        if option not in columns:
            raise DataError(f"{where}: no column '{option}' for --{kind}-column; columns: {', '.join(columns)}")
        return option
    typed = {"image": "Image", "audio": "Audio", "label": "ClassLabel"}.get(kind)
    for column in columns:
        if typed and _type(features, column) == typed:
            return column
    for name in names:
        if name in columns:
            if kind in ("image", "audio") and not pa.types.is_struct(schema.field(name).type):
                continue
            if kind == "text" and not pa.types.is_string(schema.field(name).type) and \
                    not pa.types.is_large_string(schema.field(name).type):
                continue
            return name
    return None


def _extension(value: dict[str, Any], data: bytes, default: str) -> str:
    suffix = Path(str(value.get("path") or "")).suffix.lower()
    if suffix:
        return suffix
    if data[:4] == b"RIFF":
        return ".webp" if data[8:12] == b"WEBP" else ".wav"
    return next((ext for magic, ext in _SIGNATURES if data.startswith(magic)), default)


def _media(writer: ImportWriter, value: Any, kind: str, split: str, row: int, source: Path, where: str) -> str | None:
    """The manifest path of one Image/Audio value (written out when it holds bytes or an array)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DataError(f"{where}: the {kind} column holds {type(value).__name__}, not an Image/Audio struct")
    data = value.get("bytes")
    if data:
        return writer.save_bytes(f"media/{split}/{row}{_extension(value, data, '.bin')}", data)
    if kind == "audio" and value.get("array") is not None:
        import numpy as np
        import soundfile as sf

        buffer = io.BytesIO()
        sf.write(buffer, np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]), format="WAV")
        return writer.save_bytes(f"media/{split}/{row}.wav", buffer.getvalue())
    if value.get("path"):
        base = source if source.is_dir() else source.parent
        path = Path(value["path"]) if Path(value["path"]).is_absolute() else base / value["path"]
        if path.is_file():
            return str(path.resolve())
        writer.missing(f"{kind} (file not found)")
    return None


def import_hf(source: Path, writer: ImportWriter) -> None:
    """Imports every split of a save_to_disk folder or set of Parquet files."""
    options = writer.options
    chosen: dict[str, str | None] = {}
    label_names: list[str] = []
    for part in _parts(source):
        row = 0
        for path in part.files:
            for batch in _batches(path):
                schema = batch.schema
                chosen = {
                    "image": _pick("image", options.image_column, schema, part.features, ("image", "img"), path),
                    "audio": _pick("audio", options.audio_column, schema, part.features, ("audio",), path),
                    "text": _pick("text", options.text_column, schema, part.features, TEXT_NAMES, path),
                    "label": _pick("label", options.label_column, schema, part.features, LABEL_NAMES, path),
                }
                label = chosen["label"]
                label_names = list((part.features.get(label) or {}).get("names") or []) if label else []
                for record in batch.to_pylist():
                    where = f"{path} row {row}"
                    writer.seen()
                    if writer.room(part.split):
                        _add(writer, record, chosen, label_names, part.split, row, source, where)
                    row += 1
    _suggest(writer, chosen, label_names)


def _add(writer: ImportWriter, record: dict[str, Any], chosen: dict[str, str | None], label_names: list[str],
         split: str, row: int, source: Path, where: str) -> None:
    raw_id = record.get("id")
    # An integer id column usually restarts at 0 in every split: prefixed, it stays unique.
    sample_id = f"{split}-{row}" if raw_id is None else f"{split}-{raw_id}" if isinstance(raw_id, int) else str(raw_id)
    entry: dict[str, Any] = {"id": sample_id, "split": split}
    for kind in ("image", "audio"):
        column = chosen[kind]
        if column is not None:
            try:
                entry[kind] = _media(writer, record.get(column), kind, split, row, source, where)
            except (DataError, ValueError, TypeError, OSError) as exc:
                writer.problem(f"cannot write the {kind}: {exc}", where)
                return
    if chosen["text"] is not None:
        text = record.get(chosen["text"])
        entry["text"] = str(text) if text is not None else None
    if chosen["label"] is not None:
        value = record.get(chosen["label"])
        if label_names and isinstance(value, int):
            value = label_names[value] if 0 <= value < len(label_names) else None  # -1: unlabelled (test splits)
        entry["label"] = value
    if not any(entry.get(kind) is not None for kind in ("image", "audio", "text")):
        writer.skip("no image, audio or text in the row", where)
        return
    writer.add(entry)


def _suggest(writer: ImportWriter, chosen: dict[str, str | None], label_names: list[str]) -> None:
    modalities = [kind for kind in ("audio", "image", "text") if chosen.get(kind) is not None]
    labels = [row.get("label") for row in writer.rows if row.get("label") is not None]
    if not labels:
        writer.note("no label column found (--label-column): no example config")
        return
    numeric = all(isinstance(v, float) for v in labels) and not label_names
    task = {"name": "regression"} if numeric else {"name": "classification"}
    encoders = {"audio": {"name": "audio_cnn", "dim": 64}, "image": {"name": "image_cnn", "dim": 64},
                "text": {"name": "text_gru", "dim": 64}}
    writer.suggest_config({
        "data": {"split_column": "split", "target_column": "label",
                 "modalities": {m: {"kind": m, "column": m} for m in modalities}, "batch_size": 32},
        "encoders": {m: encoders[m] for m in modalities},
        "fusion": {"name": "concat", "out_dim": 64},
        "task": task,
        "optim": {"name": "adamw", "lr": 0.001},
        "trainer": {"max_epochs": 20, "patience": 5, "output_dir": "runs/hf-import"},
    }, f"Written by `mmfuse data import hf-datasets`: {', '.join(modalities)} -> {task['name']}.\n"
       "Train with: mmfuse train -c config.yaml")
