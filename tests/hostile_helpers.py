"""Shared by the hostile-input and fuzzing tests: the benchmark modules and one small model.

The model (text, image, audio and an 8-wide features modality ``vec``; one epoch on 48 samples) is
trained once per test session, whichever test file asks first.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
LEAKS = re.compile(r"Traceback|File \"|0x[0-9a-fA-F]{6,}|object at ")
"""What no response body may contain: a traceback, an object's repr or a heap address."""


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_hostile", BENCHMARKS / "serve_hostile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()
hc = sys.modules["hostile_corpus"]
_models: dict[str, Path] = {}


def hostile_model(factory: pytest.TempPathFactory) -> Path:
    """The four-modality model, trained on first use in this session."""
    if "model" not in _models:
        _models["model"] = Path(bench.train_model(factory.mktemp("hostile-model")))
    return _models["model"]
