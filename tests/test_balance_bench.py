"""mmfuse bench --balance: each method under each trainer.balance, the balance written into runs.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmfuse.analysis.bench import planned_runs, resolve_balances
from mmfuse.cli import app
from mmfuse.config import validate_config
from mmfuse.core.errors import ConfigError


def xor_yaml(tmp_path: Path, balance: str = "none", options: dict | None = None) -> Path:
    from mmfuse.datasets.xor_features import generate_xor_features

    manifest = generate_xor_features(tmp_path / "xor", n_samples=120, dim=8)
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"manifest": str(manifest), "batch_size": 32,
                 "modalities": {"a": {"kind": "features", "column": "a"}, "b": {"kind": "features", "column": "b"}}},
        "encoders": {"a": {"name": "identity", "dim": 8}, "b": {"name": "identity", "dim": 8}},
        "fusion": {"name": "concat", "out_dim": 16},
        "trainer": {"max_epochs": 1, "patience": None, "balance": balance, "balance_options": options or {}}}))
    return config


def test_resolve_balances() -> None:
    assert resolve_balances("none, ogm_ge,agm") == ["none", "ogm_ge", "agm"]
    with pytest.raises(ConfigError, match=r"--balance 'ogm' is not a balance method; choose from none, ogm_ge"):
        resolve_balances("none,ogm")


def test_plan_runs_each_method_under_each_balance(tmp_path: Path) -> None:
    config = validate_config(yaml.safe_load(xor_yaml(tmp_path, "ogm_ge", {"alpha": 0.9}).read_text()))
    plan = planned_runs(config, ["concat", "late"], [0.0], unimodal=True, balances=["none", "ogm_ge", "grad_blend"])
    labels = [label for label, _, _ in plan]
    assert labels == ["a only", "b only", "concat", "concat+ogm_ge", "concat+grad_blend",
                      "late", "late+ogm_ge", "late+grad_blend"]
    by_label = {label: cfg for label, _, cfg in plan}
    assert by_label["a only"].trainer.balance == "none" and by_label["a only"].trainer.balance_options == {}
    assert by_label["concat+ogm_ge"].trainer.balance_options == {"alpha": 0.9}  # the config's own options
    assert by_label["late+grad_blend"].trainer.balance_options == {}
    assert by_label["late"].fusion.name == "late" and by_label["late"].trainer.balance == "none"
    # Without --balance: the config's own balance, in the label.
    assert [label for label, _, _ in planned_runs(config, ["concat"], [0.0], unimodal=False)] == ["concat+ogm_ge"]


def test_bench_cli_writes_the_balance_into_runs_csv(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "-c", str(xor_yaml(tmp_path)), "--methods", "concat", "--seeds", "1",
                                      "--no-unimodal", "--balance", "none,agm", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["balance"]) for r in rows] == [("concat", "none"), ("concat+agm", "agm")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    bad = CliRunner().invoke(app, ["bench", "-c", str(xor_yaml(tmp_path)), "--balance", "ogm", "--out", str(out)])
    assert bad.exit_code == 1 and "not a balance method" in bad.output
