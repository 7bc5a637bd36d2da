"""Whether the model is being captured into a static graph (ONNX export) rather than run eagerly.

Eager code may take shortcuts that depend on tensor values, because Python sees the values: "every
row of this batch is present, so skip the masking" or "no row has this modality, so skip its
encoder". A traced graph freezes whichever branch its example input took, so a graph exported from
a batch with every modality present would silently compute the wrong thing for a subset. Such
shortcuts ask ``eager_all`` (or ``capturing_graph``) instead of ``bool(tensor)``: eagerly they behave
exactly as before, and while ``graph_capture()`` is active they always take the general, mask-based
path, which is correct for every input. A module-level flag, not a context variable, because the
exporter's tracer reads plain globals without complaint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

_capturing = False


@contextmanager
def graph_capture() -> Iterator[None]:
    """Within the block every value-dependent shortcut takes its general, mask-based path."""
    global _capturing
    previous = _capturing
    _capturing = True
    try:
        yield
    finally:
        _capturing = previous


def capturing_graph() -> bool:
    """True inside ``graph_capture()``: the code runs once to be recorded, not to compute a result."""
    return _capturing


def eager_all(mask: Tensor) -> bool:
    """``bool(mask.all())`` when running eagerly; always False while a graph is captured.

    Callers use it to guard a fast path that is valid only when every entry is True, so the
    captured graph keeps the general path whatever the example input held.
    """
    return not _capturing and bool(mask.all())


def eager_any(mask: Tensor) -> bool:
    """``bool(mask.any())`` when running eagerly; always True while a graph is captured.

    Callers use it to skip work whose result would be masked out anyway (an encoder of a modality
    no row has); the captured graph always does that work and relies on the masks.
    """
    return _capturing or bool(mask.any())
