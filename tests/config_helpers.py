"""Config sections for tests that build every registered fusion method from a config.

A config may set only the common options its components take (``late`` takes no ``fusion.out_dim``:
its width is the task's number of outputs, and no MLP head follows it to take ``task.head_*``), so
these ask the registry instead of naming methods.
"""

from __future__ import annotations

from typing import Any

from mmfuse.config.schema import outputs_decisions
from mmfuse.fusion import FUSIONS


def fusion_section(name: str, out_dim: int, **options: Any) -> dict[str, Any]:
    """The ``fusion`` section of method ``name``, with ``out_dim`` only when the method takes it."""
    width = {"out_dim": out_dim} if "out_dim" in FUSIONS.common_options(name) else {}
    return {"name": name, **width, **options}


def head_options(fusion: str, **head: Any) -> dict[str, Any]:
    """The task's ``head_*`` options ``head``, or none after a fusion that outputs decisions (``late``)."""
    return {} if outputs_decisions(fusion) else head
