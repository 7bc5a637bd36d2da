"""Small building blocks shared by fusion methods and task heads."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Module:
    """Linear when hidden == 0, else Linear-GELU-Dropout-Linear."""
    if hidden <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
