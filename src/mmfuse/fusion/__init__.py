"""Fusion methods behind one contract, one file per family. Importing this registers every built-in."""

from mmfuse.core.registry import FUSIONS
from mmfuse.fusion import bottleneck, coattention, decision, early, graph, mult, tensor, weighting
from mmfuse.fusion.base import Fusion

__all__ = ["FUSIONS", "Fusion", "bottleneck", "coattention", "decision", "early", "graph", "mult", "tensor",
           "weighting"]
