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
        ids = self.hf(text, truncation=True, max_length=self.max_length)["input_ids"]
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
    """``prep`` with size, mean and std taken from its ``processor`` (unchanged when it has none).

    Square resizing to the processor's crop (or resize) height: ``ImagePrep`` resizes without
    cropping, which keeps the whole image; models with a fixed input size need only that size.
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
    """size / mean / std (per channel) / mode of a Hugging Face image processor."""
    size = _processor_size(processor, where)
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in _as_list(processor.image_mean))
        std = tuple(float(v) for v in _as_list(processor.image_std))
    else:
        mean, std = (0.0,), (1.0,)
    if not getattr(processor, "do_rescale", True):
        raise ConfigError(f"data.image.processor '{where}' does not rescale pixels to [0, 1]; mmfuse always does")
    return {"size": size, "mean": mean, "std": std, "mode": "rgb"}


def _as_list(value: Any) -> list[float]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _processor_size(processor: Any, where: str) -> int:
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if size is None or (attr == "crop_size" and not getattr(processor, "do_center_crop", False)):
            continue
        if isinstance(size, int):
            return size
        info = dict(size) if not isinstance(size, dict) else size
        for key in ("height", "shortest_edge"):
            if info.get(key):
                return int(info[key])
    raise ConfigError(f"data.image.processor '{where}': cannot tell its image size")
