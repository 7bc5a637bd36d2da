"""Shared fixtures. Hugging Face stays offline so no test can reach the network."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tri-modal set, 160 samples, every modality present."""
    from mmfuse.datasets.synth import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synth"), n_samples=160, seed=0, missing_rate=0.0)


@pytest.fixture(scope="session")
def synth_missing_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set, 120 samples, each modality dropped with probability 0.3."""
    from mmfuse.datasets.synth import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synth_missing"), n_samples=120, seed=0, missing_rate=0.3)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: a second intra-op thread only adds overhead (4x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
