"""Preprocessing that a pretrained model dictates: its tokenizer, its image processor's settings.

A pretrained encoder only works on the inputs it was trained on: BERT on its WordPiece ids, a
ViT on images resized and normalised as its processor says. ``PretrainedTokenizer`` wraps
``AutoTokenizer`` with the interface of the built-in word ``Tokenizer`` (``encode``,
``vocab_size``, ``to_dict``), and saves its files inside the model folder so that a saved model
encodes text exactly as in training without the original hub name or folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfuse.config import ImagePrep
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.core.hub import resolve_source
from mmfuse.data.text import well_formed

FORMAT = "hf-tokenizer"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:300]


class PretrainedTokenizer:
    """A Hugging Face tokenizer behind the word tokenizer's interface.

    ``encode`` adds the model's special tokens ([CLS] ... [SEP]) and truncates to ``max_length``
    ids including them; text with no characters gives [] so the sample counts as lacking text,
    exactly as with the word tokenizer.
    """

    def __init__(self, source: str, max_length: int, tokenizer: Any) -> None:
        self.source = source
        self.max_length = max_length
        self.hf = tokenizer

    @classmethod
    def load(cls, source: str, max_length: int, folder: str | Path | None = None) -> PretrainedTokenizer:
        """Loads from ``folder`` (a saved model's copy) when given, else from ``source``."""
        from transformers import AutoTokenizer  # lazy: transformers is slow to import

        where = str(folder) if folder is not None else resolve_source(source, "data.text.tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"data.text.tokenizer: cannot load a tokenizer from '{where}': {_reason(exc)}") from None
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"data.text.tokenizer: the tokenizer of '{source}' has no padding token")
        return cls(source, max_length, tokenizer)

    def encode(self, text: str) -> list[int]:
        if not text.strip():
            return []
        ids = self.hf(well_formed(text), truncation=True, max_length=self.max_length)["input_ids"]
        return [int(i) for i in ids]

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    def save(self, folder: Path) -> None:
        self.hf.save_pretrained(str(folder))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "source": self.source, "max_length": self.max_length}

    @staticmethod
    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and d.get("format") == FORMAT

    @classmethod
    def from_dict(cls, d: dict[str, Any], folder: Path | None) -> PretrainedTokenizer:
        """Rebuilds from the saved files in ``folder``; without a folder, from the original source."""
        try:
            source, max_length = str(d["source"]), int(d["max_length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"pretrained tokenizer state is malformed: {exc}") from None
        if folder is not None and not folder.is_dir():
            raise DataError(f"the saved tokenizer folder {folder} is missing")
        return cls.load(source, max_length, folder)

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({self.source!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"


def image_prep_from_processor(prep: ImagePrep) -> ImagePrep:
    """``prep`` with the framing (resize, crop, resample), mean and std of its ``processor``.

    Unchanged when it has none. The framing follows the processor: a CLIP-style processor resizes
    the shorter side and centre-crops, a ViT-style one resizes to a square; squashing a non-square
    photo for a model trained on crops would feed it distorted objects.
    """
    if not prep.processor:
        return prep
    from transformers import AutoImageProcessor

    source = resolve_source(prep.processor, "data.image.processor")
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"data.image.processor: cannot load an image processor from '{source}': "
                          f"{_reason(exc)}") from None
    return prep.model_copy(update=processor_settings(processor, prep.processor))


def processor_settings(processor: Any, where: str) -> dict[str, Any]:
    """size / resize / resize_size / resample / mean / std (per channel) / mode of a HF image processor."""
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in _as_list(processor.image_mean))
        std = tuple(float(v) for v in _as_list(processor.image_std))
    else:
        mean, std = (0.0,), (1.0,)
    if not getattr(processor, "do_rescale", True):
        raise ConfigError(f"data.image.processor '{where}' does not rescale pixels to [0, 1]; mmfuse always does")
    return {**_framing(processor, where), "mean": mean, "std": std, "mode": "rgb"}


_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _as_list(value: Any) -> list[float]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _size(value: Any, processor: Any) -> dict[str, int]:
    """A processor's size setting as a plain dict (it may be an int, a dict or a ``SizeDict``)."""
    if value is None:
        return {}
    if isinstance(value, int):
        square = getattr(processor, "default_to_square", True)
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {k: int(v) for k, v in items if v is not None and k in ("height", "width", "shortest_edge")}


def _square(size: dict[str, int], what: str, where: str) -> int:
    if size.get("height") != size.get("width"):
        raise ConfigError(f"data.image.processor '{where}': its {what} {size['height']}x{size['width']} is not "
                          "square; mmfuse feeds square images")
    return size["height"]


def _framing(processor: Any, where: str) -> dict[str, Any]:
    """How the processor frames an image: Hugging Face's resize, crop_pct and centre-crop semantics.

    - ``size: {height, width}`` resizes to that square (ViT; DeiT/BEiT then centre-crop ``crop_size``);
    - ``size: {shortest_edge}`` resizes the shorter side, keeping the aspect ratio, then centre-crops
      ``crop_size`` (CLIP); without a crop the output would not be square, so it is cropped to a
      ``shortest_edge`` square;
    - ``crop_pct`` (ConvNeXt below 384 px): the shorter side to int(shortest_edge / crop_pct), then a
      ``shortest_edge`` crop; ConvNeXt from 384 px up resizes to the square, no crop.
    """
    size = _size(getattr(processor, "size", None), processor)
    crop = _size(getattr(processor, "crop_size", None), processor) if getattr(processor, "do_center_crop", False) \
        else {}
    resample = _RESAMPLE_NAMES.get(int(getattr(processor, "resample", 2) or 2), "bilinear")
    crop_pct = getattr(processor, "crop_pct", None)
    final = _square(crop, "crop_size", where) if crop.get("height") else None
    if "shortest_edge" in size:
        edge = size["shortest_edge"]
        if crop_pct and not crop:
            if type(processor).__name__.startswith("ConvNext") and edge >= 384:
                return {"size": edge, "resize": "squash", "resize_size": None, "resample": resample}
            return {"size": edge, "resize": "shortest_edge", "resize_size": int(edge / crop_pct),
                    "resample": resample}
        final = final or edge
        resize_size = int(edge / crop_pct) if crop_pct else edge
        if final > resize_size:
            raise ConfigError(f"data.image.processor '{where}': its crop_size {final} is larger than its "
                              f"shortest_edge {resize_size}")
        return {"size": final, "resize": "shortest_edge", "resize_size": resize_size, "resample": resample}
    if "height" in size:
        square = _square(size, "size", where)
        final = final or square
        if final > square:
            raise ConfigError(f"data.image.processor '{where}': its crop_size {final} is larger than its size "
                              f"{square}")
        return {"size": final, "resize": "squash", "resize_size": square if square != final else None,
                "resample": resample}
    raise ConfigError(f"data.image.processor '{where}': cannot tell its image size")
