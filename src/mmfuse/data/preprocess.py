"""Turns one raw field (text, image path, audio path) into the tensors an encoder reads.

The ``Preprocessor`` is saved with the model (settings + fitted vocabularies), so training,
evaluation and ``mmfuse predict`` preprocess a sample in exactly the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmfuse.config import AudioPrep, FeaturesPrep, ImagePrep, ModalitySpec, TextPrep, VideoPrep
from mmfuse.core.contracts import EncoderContext
from mmfuse.core.errors import DataError
from mmfuse.data.array_rows import is_array_reference, load_image_array, load_spectrogram_array, spectrogram_tensor
from mmfuse.data.arrays import load_array
from mmfuse.data.audio import CropTally, load_waveform, log_mel, log_mel_batch
from mmfuse.data.image import decode_image, image_to_tensor
from mmfuse.data.manifest import Record
from mmfuse.data.pretrained_prep import PretrainedTokenizer, image_prep_from_processor
from mmfuse.data.text import Tokenizer
from mmfuse.data.video import decode_video, frames_to_tensor, load_video_waveform

ModalityInputs = dict[str, Tensor]
RawInput = str | Image.Image | np.ndarray | list[Image.Image]
"""A decoded field: text, a PIL image, a mono waveform, a feature array or a video's frames
(see ``Preprocessor.decode``)."""
AnyTokenizer = Tokenizer | PretrainedTokenizer
TOKENIZER_DIR = "tokenizers"
"""Sub-folder of a saved model that holds one pretrained tokenizer folder per text modality."""


class Preprocessor:
    def __init__(
        self,
        modalities: dict[str, ModalitySpec],
        text: TextPrep,
        image: ImagePrep,
        audio: AudioPrep,
        tokenizers: dict[str, AnyTokenizer] | None = None,
        features: FeaturesPrep | None = None,
        feature_dims: dict[str, int] | None = None,
        video: VideoPrep | None = None,
    ) -> None:
        self.modalities = {m: modalities[m] for m in sorted(modalities)}
        self.text, self.image, self.audio = text, image, audio
        self.features = features or FeaturesPrep()
        self.video = video or VideoPrep()
        self.tokenizers = dict(tokenizers or {})
        self.feature_dims = dict(feature_dims or {})
        self.crops = CropTally()
        """Audio clips ``decode`` cropped to ``audio.max_seconds`` (not saved: a run reports it once)."""

    def kind(self, modality: str) -> str:
        return self.modalities[modality].kind

    def fit(self, records: list[Record]) -> None:
        """Fits a vocabulary per text modality and the feature width D per features modality.

        D comes from the first training sample that has the modality; every other sample (of any
        split) must agree, which ``encode_decoded`` checks, naming the row.
        """
        # A pretrained image processor's size/mean/std become the image settings the model records.
        if any(spec.kind == "image" for spec in self.modalities.values()):
            self.image = image_prep_from_processor(self.image)
        if any(spec.kind == "video" for spec in self.modalities.values()):
            self.video = image_prep_from_processor(self.video)  # type: ignore[assignment]  # a VideoPrep copy
        for modality, spec in self.modalities.items():
            if spec.kind == "text" and self.text.tokenizer:
                self.tokenizers[modality] = PretrainedTokenizer.load(self.text.tokenizer, self.text.max_length)
            elif spec.kind == "text":
                texts = [r.fields[modality] or "" for r in records]
                self.tokenizers[modality] = Tokenizer.fit(texts, self.text)
            elif spec.kind == "features":
                first = next((r for r in records if r.fields.get(modality) is not None), None)
                if first is None:
                    raise DataError(f"no training sample has the features modality '{modality}'")
                try:
                    array = load_array(first.fields[modality])  # type: ignore[arg-type]
                except DataError as exc:
                    raise DataError(f"{first.where}: {exc}") from None
                self.feature_dims[modality] = int(array.shape[-1])

    def encode(self, modality: str, value: str) -> ModalityInputs | None:
        """One present field -> input tensors; None when the field turns out to hold nothing.

        Raises DataError naming the file for unreadable inputs.
        """
        raw = self.decode(modality, value)
        if self.kind(modality) != "features":
            return self.encode_decoded(modality, raw)
        try:
            return self.encode_decoded(modality, raw)
        except DataError as exc:  # the array reader named the file; a width mismatch must too
            raise DataError(f"{value}: {exc}") from None

    def decode(self, modality: str, value: str) -> RawInput:
        """The first half of ``encode``: the raw input in memory, before features are computed.

        text -> the string itself; image -> the upright RGB/L ``PIL.Image`` at its own size;
        audio -> the mono float32 waveform at ``audio.sample_rate``, cropped to ``max_seconds`` (of the
        video file's audio track with ``from_video``); video -> the chosen frames as PIL images;
        features -> the float32 array of shape (T, D) or (D,) (see ``mmfuse.data.arrays``).
        Robustness tests corrupt this raw input and finish with ``encode_decoded``, so a file is
        read once however many corruptions are tried.
        """
        kind = self.kind(modality)
        if kind == "text":
            return value
        if kind == "image":
            if is_array_reference(value):  # an array row (e.g. AV-MNIST's image/train_data.npy#12)
                return load_image_array(value)
            return decode_image(Path(value), self.image)
        if kind == "audio":
            if is_array_reference(value):  # a precomputed (n_mels, T) spectrogram
                spectrogram = load_spectrogram_array(value, self.audio)
                if spectrogram.shape[1] > self.audio.max_frames:  # cropped by ``spectrogram_tensor``
                    self.crops.add((spectrogram.shape[1] - 1) * self.audio.hop_length / self.audio.sample_rate)
                return spectrogram
            if self.modalities[modality].from_video:
                return load_video_waveform(Path(value), self.audio, self.crops)
            return load_waveform(Path(value), self.audio, self.crops)
        if kind == "features":
            return load_array(value)
        if kind == "video":
            return decode_video(Path(value), self.video)
        raise DataError(f"unknown modality kind '{kind}'")

    def encode_decoded(self, modality: str, raw: RawInput) -> ModalityInputs | None:
        """The second half of ``encode``: a decoded raw input (see ``decode``) -> input tensors."""
        kind = self.kind(modality)
        if kind == "text":
            assert isinstance(raw, str), f"text modality '{modality}' expects a string"
            ids = self._tokenizer(modality).encode(raw)
            return {"input_ids": torch.tensor(ids, dtype=torch.long)} if ids else None
        if kind == "image":
            assert isinstance(raw, Image.Image), f"image modality '{modality}' expects a PIL image"
            return {"pixels": image_to_tensor(raw, self.image)}
        if kind == "audio":
            assert isinstance(raw, np.ndarray), f"audio modality '{modality}' expects a waveform"
            if raw.ndim == 2:  # a precomputed spectrogram (see ``mmfuse.data.array_rows``)
                return {"mel": spectrogram_tensor(raw, self.audio)}
            return self._audio_inputs(self._gain(raw))
        if kind == "features":
            assert isinstance(raw, np.ndarray), f"features modality '{modality}' expects an array"
            return {"values": self._feature_values(modality, raw)}
        if kind == "video":
            assert isinstance(raw, list), f"video modality '{modality}' expects a list of frames"
            return {"pixels": frames_to_tensor(raw, self.video)}
        raise DataError(f"unknown modality kind '{kind}'")

    def _feature_values(self, modality: str, array: np.ndarray) -> torch.Tensor:
        """(T, D) or (D,) -> (min(T, max_length), D) float32; D must match the fitted width."""
        if modality not in self.feature_dims:
            raise DataError(f"the features modality '{modality}' has no fitted feature width")
        if array.ndim not in (1, 2):
            raise DataError(f"features must be (T, D) or (D,), got shape {tuple(array.shape)}")
        values = array.reshape(1, -1) if array.ndim == 1 else array
        if values.shape[1] != self.feature_dims[modality]:
            raise DataError(f"feature width D={values.shape[1]} (shape {tuple(array.shape)}) but the training "
                            f"data of '{modality}' has D={self.feature_dims[modality]}")
        if values.shape[0] == 0:
            raise DataError(f"empty feature sequence (shape {tuple(array.shape)})")
        return torch.tensor(np.asarray(values[: self.features.max_length], dtype=np.float32))

    def encode_decoded_many(self, modality: str, raws: Sequence[RawInput]) -> list[ModalityInputs | None]:
        """``encode_decoded`` of many raw inputs; audio clips of equal length share one batched STFT."""
        if self.audio.features != "log_mel" or self.audio.normalize_dbfs is not None:
            return [self.encode_decoded(modality, raw) for raw in raws]
        if self.kind(modality) != "audio" or any(np.ndim(raw) == 2 for raw in raws):  # type: ignore[arg-type]
            return [self.encode_decoded(modality, raw) for raw in raws]
        for raw in raws:
            assert isinstance(raw, np.ndarray), f"audio modality '{modality}' expects waveforms"
        return [{"mel": mel} for mel in log_mel_batch(raws, self.audio)]  # type: ignore[arg-type]

    def encode_record(self, record: Record) -> dict[str, ModalityInputs | None]:
        return {
            m: None if record.fields.get(m) is None else self.encode(m, record.fields[m])  # type: ignore[arg-type]
            for m in self.modalities
        }

    def _gain(self, waveform: np.ndarray) -> np.ndarray:
        """Scales a clip to ``audio.normalize_dbfs`` RMS (silence stays silence); no-op when unset."""
        if self.audio.normalize_dbfs is None:
            return waveform
        rms = float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))
        if rms <= 0:
            return waveform
        return (waveform * np.float32(10 ** (self.audio.normalize_dbfs / 20) / rms)).astype(np.float32)

    def _audio_inputs(self, waveform: np.ndarray) -> ModalityInputs:
        """log-mel (``mel``) or, for encoders that read samples, the waveform itself."""
        if self.audio.features == "waveform":
            return {"waveform": torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))}
        return {"mel": log_mel(waveform, self.audio)}

    def _tokenizer(self, modality: str) -> AnyTokenizer:
        if modality not in self.tokenizers:
            raise DataError(f"the text modality '{modality}' has no fitted vocabulary")
        return self.tokenizers[modality]

    def context(self, modality: str) -> EncoderContext:
        kind = self.kind(modality)
        if kind == "text":
            tokenizer = self._tokenizer(modality)
            return EncoderContext(kind=kind, vocab_size=tokenizer.vocab_size, max_length=self.text.max_length,
                                  tokenizer=tokenizer.source if isinstance(tokenizer, PretrainedTokenizer) else "")
        if kind == "image":
            return EncoderContext(kind=kind, channels=self.image.channels, image_size=self.image.size,
                                  image_mean=_per_channel(self.image.mean, self.image.channels),
                                  image_std=_per_channel(self.image.std, self.image.channels))
        if kind == "features":
            if modality not in self.feature_dims:
                raise DataError(f"the features modality '{modality}' has no fitted feature width")
            return EncoderContext(kind=kind, feature_dim=self.feature_dims[modality],
                                  max_length=self.features.max_length)
        if kind == "video":
            return EncoderContext(kind=kind, channels=self.video.channels, image_size=self.video.size,
                                  image_mean=_per_channel(self.video.mean, self.video.channels),
                                  image_std=_per_channel(self.video.std, self.video.channels),
                                  max_length=self.video.frames)
        return EncoderContext(kind=kind, n_mels=self.audio.n_mels, max_frames=self.audio.max_frames,
                              audio_features=self.audio.features, sample_rate=self.audio.sample_rate,
                              n_fft=self.audio.n_fft, hop_length=self.audio.hop_length)

    def save_assets(self, folder: Path) -> None:
        """Writes the pretrained tokenizers' files under ``folder/tokenizers/<modality>``."""
        for modality, tokenizer in self.tokenizers.items():
            if isinstance(tokenizer, PretrainedTokenizer):
                tokenizer.save(folder / TOKENIZER_DIR / modality)

    def state(self) -> dict[str, Any]:
        return {
            "modalities": {m: s.model_dump() for m, s in self.modalities.items()},
            "text": self.text.model_dump(),
            "image": self.image.model_dump(),
            "audio": self.audio.model_dump(mode="json"),
            "features": self.features.model_dump(),
            "tokenizers": {m: t.to_dict() for m, t in self.tokenizers.items()},
            "feature_dims": dict(self.feature_dims),
            # Only with a video modality: the state (and the cache keys made from it) of other runs
            # stays as it was before video existed.
            **({"video": self.video.model_dump()} if self._has_video else {}),
        }

    @property
    def _has_video(self) -> bool:
        return any(spec.kind == "video" for spec in self.modalities.values())

    @classmethod
    def from_state(cls, state: dict[str, Any], folder: Path | None = None) -> Preprocessor:
        """Rebuilds a saved preprocessor; ``folder`` is the model folder holding tokenizer files."""
        return cls(
            modalities={m: ModalitySpec(**s) for m, s in state["modalities"].items()},
            text=TextPrep(**state["text"]),
            image=ImagePrep(**state["image"]),
            audio=AudioPrep(**state["audio"]),
            tokenizers={m: _tokenizer_from_dict(m, t, folder) for m, t in state["tokenizers"].items()},
            # Absent from models saved before the features modality existed.
            features=FeaturesPrep(**state.get("features", {})),
            feature_dims={m: int(d) for m, d in state.get("feature_dims", {}).items()},
            video=VideoPrep(**state.get("video", {})),
        )


def _tokenizer_from_dict(modality: str, state: dict[str, Any], folder: Path | None) -> AnyTokenizer:
    if PretrainedTokenizer.is_state(state):
        return PretrainedTokenizer.from_dict(state, None if folder is None else folder / TOKENIZER_DIR / modality)
    return Tokenizer.from_dict(state)


def _per_channel(value: float | tuple[float, ...], channels: int) -> tuple[float, ...]:
    values = value if isinstance(value, tuple) else (value,)
    return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)
