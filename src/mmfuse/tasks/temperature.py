"""Temperature scaling of a classifier's logits, one temperature per set of present modalities.

A fused classifier trained on complete samples is over-confident when a modality is missing at
prediction time: its logits keep the scale they had with every modality present, while the
evidence behind them shrank (a concat model on the embedded data said 0.71 where about 0.5 was
right). A single temperature (Guo et al. 2017, "On Calibration of Modern Neural Networks")
cannot fix that, because the right scale differs between "all present" and "one missing". So
the temperature is looked up by the sample's presence pattern (which modalities it has), each
fitted on the validation split with that pattern imposed, and a global one covers patterns
that had too few validation samples to fit.

Dividing logits by a positive temperature never changes the arg-max: accuracy, F1 and every
other decision metric are unchanged; only the probabilities (and so the loss and the
calibration error) move. The table is part of the task's saved state (``preprocessing.json``),
and the lookup is tensor arithmetic, so an exported ONNX graph carries it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

NOTHING_PRESENT = "none"
"""The pattern name of a sample with every modality hidden."""


def pattern_name(present: Sequence[str]) -> str:
    """'audio+image' for a sample with exactly those modalities; 'none' for no modality."""
    return "+".join(sorted(present)) or NOTHING_PRESENT


@dataclass
class PresenceTemperature:
    """Per-pattern temperatures over ``modalities`` (sorted), with ``default`` for the others."""

    modalities: list[str]
    default: float = 1.0
    by_pattern: dict[str, float] = field(default_factory=dict)
    _table: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Builds the lookup table here, eagerly: a tensor first made while ``torch.export`` traces the
        model would be a fake one, and caching it would break every later eager call."""
        self.modalities = sorted(self.modalities)
        for name, value in (("default", self.default), *self.by_pattern.items()):
            if not value > 0:
                raise ValueError(f"temperature of '{name}' must be > 0, got {value}")
        values = []
        for code in range(2 ** len(self.modalities)):
            present = [m for i, m in enumerate(self.modalities) if code >> i & 1]
            values.append(self.by_pattern.get(pattern_name(present), self.default))
        self._table = torch.tensor(values, dtype=torch.float32)

    def table(self) -> Tensor:
        """(2^M,) temperatures indexed by the pattern code: bit i set when modality i is present."""
        return self._table

    def codes(self, present: Mapping[str, Tensor], batch_size: int, device: torch.device) -> Tensor:
        """(B,) pattern codes; a modality the batch does not carry at all counts as absent."""
        code = torch.zeros(batch_size, dtype=torch.long, device=device)
        for i, modality in enumerate(self.modalities):
            if modality in present:
                code = code + present[modality].to(device).long() * (1 << i)
        return code

    def scale(self, logits: Tensor, present: Mapping[str, Tensor]) -> Tensor:
        """``logits / T(pattern)`` row by row."""
        codes = self.codes(present, logits.shape[0], logits.device)
        temperature = self.table().to(logits.device)[codes]
        return logits / temperature.to(logits.dtype).unsqueeze(-1)

    def state(self) -> dict[str, Any]:
        return {"modalities": self.modalities, "default": self.default, "by_pattern": dict(self.by_pattern)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PresenceTemperature:
        return cls(list(state["modalities"]), float(state["default"]),
                   {str(k): float(v) for k, v in dict(state.get("by_pattern", {})).items()})
