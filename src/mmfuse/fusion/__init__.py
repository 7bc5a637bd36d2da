"""Fusion methods behind one contract. Importing this registers every built-in method."""

from mmfuse.fusion import attention, graph, late, simple, tensor
from mmfuse.fusion.base import FUSIONS, Fusion, masked_modality_mean, stack_presence

__all__ = ["FUSIONS", "Fusion", "attention", "graph", "late", "masked_modality_mean", "simple", "stack_presence",
           "tensor"]
