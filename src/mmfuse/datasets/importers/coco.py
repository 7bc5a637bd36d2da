"""COCO Captions (and the Karpathy splits) -> image-caption rows.

Layouts followed:

- **COCO captions** (cocodataset.org/#format-data, ``annotations/captions_train2017.json``):
  ``{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}], ...}``.
  The split is the file's own (``captions_train2017.json`` -> train, ``..._val...`` -> val); a
  folder source takes every ``captions_*.json`` in it.
- **Karpathy splits** (``--karpathy dataset_coco.json``, from Karpathy's NeuralTalk release):
  ``{"images": [{"filepath", "filename", "cocoid", "split", "sentences": [{"raw", ...}]}]}`` with
  split train / restval (-> train) / val / test; it then decides each image's split, and images
  it does not list are skipped and counted.

Images resolve under ``--images`` (default: the JSON's folder) as ``<file_name>``,
``<split folder>/<file_name>`` (``train2017/...``) or any file of that name below it; a missing
image is counted, not fatal. One row per caption: ``image``, ``text``, ``group`` = the COCO image
id (any of an image's captions is a correct retrieval; the example config's contrastive task uses
``group`` as its label, so class-level recall is image-level recall).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.writer import ImportWriter

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _own_split(path: Path) -> str:
    match = re.search(r"(train|val|test)", path.stem)
    return {"train": "train", "val": "val", "test": "test"}[match.group(1)] if match else "train"


def _karpathy(path: Path) -> dict[int, str]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (expected {{'images': [...]}})")
    splits: dict[int, str] = {}
    for i, image in enumerate(data["images"]):
        try:
            splits[int(image["cocoid"])] = KARPATHY_SPLITS[image["split"]]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path} images[{i}]: needs 'cocoid' and a 'split' in "
                            f"{', '.join(KARPATHY_SPLITS)}") from None
    return splits


def _image_index(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in names:
            index.setdefault(name, Path(folder) / name)
    return index


def import_coco(source: Path, writer: ImportWriter) -> None:
    """Imports one COCO captions JSON, or every ``captions_*.json`` in a folder."""
    files = sorted(source.glob("captions_*.json")) if source.is_dir() else [source]
    if not files:
        raise DataError(f"{source}: no captions_*.json files")
    karpathy = _karpathy(writer.options.karpathy) if writer.options.karpathy else None
    root = writer.options.images or files[0].parent
    if not root.is_dir():
        raise DataError(f"images folder not found: {root}")
    index = _image_index(root)
    for path in files:
        data = _load_json(path)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise DataError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
        images = {}
        for i, image in enumerate(data["images"]):
            try:
                images[int(image["id"])] = str(image["file_name"])
            except (KeyError, TypeError, ValueError):
                writer.problem("image entry needs 'id' and 'file_name'", f"{path} images[{i}]")
        own = _own_split(path)
        folder = re.search(r"(train|val|test)\d*", path.stem)
        for i, ann in enumerate(data["annotations"]):
            where = f"{path} annotations[{i}]"
            writer.seen()
            try:
                image_id, caption, ann_id = int(ann["image_id"]), str(ann["caption"]).strip(), ann["id"]
            except (KeyError, TypeError, ValueError):
                writer.problem("annotation needs 'id', 'image_id' and 'caption'", where)
                continue
            if image_id not in images:
                writer.problem(f"image_id {image_id} is not in 'images'", where)
                continue
            split = own if karpathy is None else karpathy.get(image_id, "")
            if not split:
                writer.skip("image not in the Karpathy split", where)
                continue
            if not caption:
                writer.problem("empty caption", where)
                continue
            if not writer.room(split):
                continue
            name = images[image_id]
            candidates = [root / name] + ([root / folder.group(0) / name] if folder else [])
            found = next((c for c in candidates if c.is_file()), None) or index.get(Path(name).name)
            if found is None:
                writer.skip("image file not found", where)
                continue
            writer.add({"id": f"coco{ann_id}", "split": split, "image": str(found.resolve()), "text": caption,
                        "group": str(image_id)})
    writer.suggest_config({
        "data": {"split_column": "split", "target_column": "group",
                 "modalities": {"image": {"kind": "image", "column": "image"},
                                "text": {"kind": "text", "column": "text"}},
                 "image": {"size": 64}, "text": {"max_length": 32}, "batch_size": 64},
        "encoders": {"image": {"name": "image_cnn", "dim": 128}, "text": {"name": "text_gru", "dim": 128}},
        "task": {"name": "contrastive", "dim": 128, "pairs": "all"},
        "optim": {"name": "adamw", "lr": 0.001},
        "trainer": {"max_epochs": 20, "patience": 5, "output_dir": "runs/coco-captions"},
    }, "Written by `mmfuse data import coco-captions`: image-text retrieval. target_column is the\n"
       "image (group), so class-level recall counts any of the image's captions.\n"
       "Train with: mmfuse train -c config.yaml")
