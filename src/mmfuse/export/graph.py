"""What an exported graph reads, and the model as a function of those flat tensors.

A graph has no ``Batch``: it reads one tensor per (modality, input name), named
``<modality>.<input>`` (``text.input_ids``, ``audio.mel``), plus one presence matrix ``present``
(B, M) bool whose columns are the model's modalities in sorted order. One graph therefore serves any
subset of modalities, row by row, exactly as ``model(batch)`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Batch
from mmfuse.core.errors import MMFuseError
from mmfuse.data.preprocess import Preprocessor
from mmfuse.model import MultimodalModel

BATCH_AXIS = "batch"
PRESENT = "present"
OUTPUTS = "outputs"
DTYPES = {"int64": torch.long, "bool": torch.bool, "float32": torch.float32}
"""The dtypes a graph input may have, by the name the sidecar writes."""


@dataclass(frozen=True)
class GraphInput:
    """One graph input: ``shape`` holds ints for fixed axes and names for dynamic ones.

    ``fill`` is the shape after the batch axis that a runtime feeds (as zeros) for a modality
    absent from a whole batch: the dynamic axes at the padded length the preprocessing gives,
    which the encoder is known to accept (some cannot shrink to a length of 1).
    """

    modality: str
    key: str
    dtype: str
    shape: tuple[int | str, ...]
    fill: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.modality}.{self.key}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def graph_inputs(preprocessor: Preprocessor) -> list[GraphInput]:
    """The inputs of every modality in sorted order, as ``Collator`` builds them.

    This mirrors ``mmfuse.data.dataset.Collator``: a new input there needs a line here, and the
    parity tests (which feed ``Collator`` batches) fail until it has one.
    """
    inputs: list[GraphInput] = []
    for m in sorted(preprocessor.modalities):
        kind = preprocessor.kind(m)
        if kind == "text":
            length = f"{m}_length"
            fill = max(2, preprocessor.text.max_length)
            inputs += [GraphInput(m, "input_ids", "int64", (BATCH_AXIS, length), (fill,)),
                       GraphInput(m, "attention_mask", "bool", (BATCH_AXIS, length), (fill,))]
        elif kind == "image":
            pixels = (preprocessor.image.channels, preprocessor.image.size, preprocessor.image.size)
            inputs.append(GraphInput(m, "pixels", "float32", (BATCH_AXIS, *pixels), pixels))
        elif kind == "audio" and preprocessor.audio.features == "waveform":
            samples, audio = f"{m}_samples", preprocessor.audio
            fill = max(2, int(audio.max_seconds * audio.sample_rate))
            inputs += [GraphInput(m, "waveform", "float32", (BATCH_AXIS, samples), (fill,)),
                       GraphInput(m, "sample_mask", "bool", (BATCH_AXIS, samples), (fill,))]
        elif kind == "audio":
            frames, audio = f"{m}_frames", preprocessor.audio
            fill = max(2, audio.max_frames)
            inputs += [GraphInput(m, "mel", "float32", (BATCH_AXIS, audio.n_mels, frames), (audio.n_mels, fill)),
                       GraphInput(m, "frame_mask", "bool", (BATCH_AXIS, frames), (fill,))]
        elif kind == "features":
            steps, dim = f"{m}_steps", preprocessor.feature_dims.get(m, 0)
            fill = max(2, min(8, preprocessor.features.max_length))
            inputs += [GraphInput(m, "values", "float32", (BATCH_AXIS, steps, dim), (fill, dim)),
                       GraphInput(m, "mask", "bool", (BATCH_AXIS, steps), (fill,))]
        else:
            raise MMFuseError(f"modality '{m}' of kind '{kind}' has no ONNX input layout")
    return inputs


class GraphModel(nn.Module):
    """``model(batch)`` as a function of ``(present, *inputs)`` in ``graph_inputs`` order.

    It rebuilds the ``Batch`` and calls the model itself, so the exported computation is the
    model's own code, not a copy that could drift; run it inside ``graph_capture()`` so every
    value-dependent shortcut takes its mask-based path (see ``mmfuse.core.tracing``).
    """

    def __init__(self, model: MultimodalModel, inputs: list[GraphInput]) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, present: Tensor, *tensors: Tensor) -> Tensor:
        modalities = self.model.modalities
        batch = Batch(inputs={m: {} for m in modalities}, present={m: present[:, i] for i, m in enumerate(modalities)})
        for spec, tensor in zip(self.inputs, tensors, strict=True):
            batch.inputs[spec.modality][spec.key] = tensor
        return self.model(batch)


def example_batch(model: MultimodalModel, inputs: list[GraphInput], size: int, shrink: int = 0,
                  seed: int = 0) -> Batch:
    """A batch of random inputs of the graph's layout, with presence varying by row.

    Dynamic axes take their ``fill`` length minus ``shrink`` (at least 2), and rows after the
    first are padded to shorter lengths, so the self-check meets lengths, padding and subsets that
    the export example did not have. Row i lacks modality ``i mod (M + 1) - 1`` (row 0 has all).
    """
    generator = torch.Generator().manual_seed(seed)
    modalities = model.modalities
    present = {m: torch.tensor([i % (len(modalities) + 1) != j + 1 for i in range(size)])
               for j, m in enumerate(modalities)}
    batch = Batch(inputs={m: {} for m in modalities}, present=present)
    for spec in inputs:
        shape = (size, *(max(2, f - shrink) if isinstance(axis, str) else f
                         for axis, f in zip(spec.shape[1:], spec.fill, strict=True)))
        if spec.dtype == "bool":
            valid = torch.arange(shape[-1])[None] < torch.linspace(shape[-1], 1, size).ceil()[:, None]
            value = valid & present[spec.modality][:, None]
        elif spec.dtype == "int64":
            vocab = max(2, model.preprocessor.context(spec.modality).vocab_size)
            value = torch.randint(1, vocab, shape, generator=generator)
        else:
            value = torch.randn(shape, generator=generator)
        batch.inputs[spec.modality][spec.key] = value
    return batch


def flat_arguments(batch: Batch, modalities: list[str], inputs: list[GraphInput]) -> tuple[Tensor, ...]:
    """``(present, *inputs)`` of a complete batch (every modality and input there), for ``GraphModel``."""
    present = torch.stack([batch.present[m] for m in modalities], dim=1)
    return (present, *(batch.inputs[spec.modality][spec.key] for spec in inputs))
