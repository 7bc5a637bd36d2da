"""Shared fixtures and the skip policy. Hugging Face stays offline so no test can reach the network.

The skip policy: a skipped test is a check that did not run, so the run fails when a test skips for a
reason outside ``ALLOWED_SKIPS``. A GPU is the one thing CI truly lacks. Chromium and the shared data
(../shared/data) may be missing on a developer's machine, but CI (``CI`` set, as every CI service and
``.ci/run`` do) has both, so there they count as failures. The end of every run lists each skip with
its reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ALLOWED_SKIPS: dict[str, tuple[str, bool]] = {
    # reason prefix -> (why it may skip, allowed in CI too)
    "needs a CUDA GPU": ("CI has no GPU", True),
    "no chromium/chromedriver on PATH": ("a developer's machine may lack Chromium; .ci/run installs it", False),
    "MNIST/FSDD not found under": ("../shared/data sits beside the clone in CI only", False),
}
_skips: list[tuple[str, str]] = []


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def skip_allowed(reason: str, ci: bool) -> bool:
    """Whether a skip with this reason is one the policy accepts (in CI or on a developer's machine)."""
    return any(reason.startswith(prefix) and (everywhere or not ci)
               for prefix, (_, everywhere) in ALLOWED_SKIPS.items())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        _skips.append((report.nodeid, reason))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if any(not skip_allowed(reason, in_ci()) for _, reason in _skips) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _skips:
        return
    ci = in_ci()
    terminalreporter.section(f"skipped: {len(_skips)} ({'CI' if ci else 'not CI'}; policy in tests/conftest.py)")
    for nodeid, reason in _skips:
        verdict = "allowed" if skip_allowed(reason, ci) else "NOT ALLOWED: this check must run"
        terminalreporter.write_line(f"{verdict}: {nodeid}: {reason}")


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
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny models: a second intra-op thread only adds overhead (4x slower on a busy 2-core box).
    MMFUSE_THREADS too, so the thread policy of a command run inside the test keeps it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("MMFUSE_THREADS", "1")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
