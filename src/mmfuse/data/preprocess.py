"""Turns one raw field (text, image path, audio path) into the tensors an encoder reads.

The ``Preprocessor`` is saved with the model (settings + fitted vocabularies), so training,
evaluation and ``mmfuse predict`` preprocess a sample in exactly the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfuse.config import AudioPrep, ImagePrep, ModalitySpec, TextPrep
from mmfuse.data.audio import load_audio
from mmfuse.data.image import load_image
from mmfuse.data.manifest import Record
from mmfuse.data.text import Tokenizer
from mmfuse.encoders.base import EncoderContext
from mmfuse.errors import DataError

ModalityInputs = dict[str, Tensor]


class Preprocessor:
    def __init__(
        self,
        modalities: dict[str, ModalitySpec],
        text: TextPrep,
        image: ImagePrep,
        audio: AudioPrep,
        tokenizers: dict[str, Tokenizer] | None = None,
    ) -> None:
        self.modalities = {m: modalities[m] for m in sorted(modalities)}
        self.text, self.image, self.audio = text, image, audio
        self.tokenizers = dict(tokenizers or {})

    def kind(self, modality: str) -> str:
        return self.modalities[modality].kind

    def fit(self, records: list[Record]) -> None:
        """Fits a vocabulary per text modality on the training records."""
        for modality, spec in self.modalities.items():
            if spec.kind == "text":
                texts = [r.fields[modality] or "" for r in records]
                self.tokenizers[modality] = Tokenizer.fit(texts, self.text)

    def encode(self, modality: str, value: str) -> ModalityInputs | None:
        """One present field -> input tensors; None when the field turns out to hold nothing.

        Raises DataError naming the file for unreadable inputs.
        """
        kind = self.kind(modality)
        if kind == "text":
            ids = self._tokenizer(modality).encode(value)
            return {"input_ids": torch.tensor(ids, dtype=torch.long)} if ids else None
        if kind == "image":
            return {"pixels": load_image(Path(value), self.image)}
        if kind == "audio":
            return {"mel": load_audio(Path(value), self.audio)}
        raise DataError(f"unknown modality kind '{kind}'")

    def encode_record(self, record: Record) -> dict[str, ModalityInputs | None]:
        return {
            m: None if record.fields.get(m) is None else self.encode(m, record.fields[m])  # type: ignore[arg-type]
            for m in self.modalities
        }

    def _tokenizer(self, modality: str) -> Tokenizer:
        if modality not in self.tokenizers:
            raise DataError(f"the text modality '{modality}' has no fitted vocabulary")
        return self.tokenizers[modality]

    def context(self, modality: str) -> EncoderContext:
        kind = self.kind(modality)
        if kind == "text":
            return EncoderContext(kind=kind, vocab_size=self._tokenizer(modality).vocab_size,
                                  max_length=self.text.max_length)
        if kind == "image":
            return EncoderContext(kind=kind, channels=self.image.channels, image_size=self.image.size)
        return EncoderContext(kind=kind, n_mels=self.audio.n_mels, max_frames=self.audio.max_frames)

    def state(self) -> dict[str, Any]:
        return {
            "modalities": {m: s.model_dump() for m, s in self.modalities.items()},
            "text": self.text.model_dump(),
            "image": self.image.model_dump(),
            "audio": self.audio.model_dump(mode="json"),
            "tokenizers": {m: t.to_dict() for m, t in self.tokenizers.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Preprocessor:
        return cls(
            modalities={m: ModalitySpec(**s) for m, s in state["modalities"].items()},
            text=TextPrep(**state["text"]),
            image=ImagePrep(**state["image"]),
            audio=AudioPrep(**state["audio"]),
            tokenizers={m: Tokenizer.from_dict(t) for m, t in state["tokenizers"].items()},
        )
