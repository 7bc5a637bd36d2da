"""``mmfuse bench --methods-config``: per-method fusion options, checked, used and recorded in runs.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmfuse.analysis.bench import planned_runs
from mmfuse.analysis.bench_methods import load_method_options, parse_method_options
from mmfuse.cli import app
from mmfuse.config import load_config
from mmfuse.config.presets import preset_path
from mmfuse.core.errors import ConfigError


def test_each_method_gets_its_options_over_its_defaults_or_the_configs() -> None:
    config = load_config(preset_path("demo"), ["fusion.name=concat", "fusion.hidden=24"])
    options = parse_method_options({"lmf": {"rank": "3"}, "concat": {"dropout": 0.2}, "mult": {"out_dim": 12}})
    assert options["lmf"] == {"rank": 3}  # coerced to the factory's type
    plan = {label: cfg for label, _, cfg in planned_runs(config, ["concat", "lmf", "mult", "late"], [0.0], False,
                                                         method_options=options)}
    assert plan["lmf"].fusion.options == {"rank": 3} and plan["lmf"].fusion.out_dim == config.fusion.out_dim
    assert plan["concat"].fusion.options == {**config.fusion.options, "dropout": 0.2}
    assert plan["concat"].fusion.options["hidden"] == 24
    assert plan["mult"].fusion.out_dim == 12 and plan["mult"].fusion.options == {}
    assert plan["late"].fusion.options == {}  # no entry: library defaults, as without the file
    unchanged = {label: cfg for label, _, cfg in planned_runs(config, ["concat", "lmf"], [0.0], False)}
    assert unchanged["concat"].fusion == config.fusion and unchanged["lmf"].fusion.options == {}


@pytest.mark.parametrize(("raw", "message"), [
    ({"lmf": {"rnk": 8}}, "unknown option 'lmf.rnk' for fusion 'lmf' (did you mean 'rank'?)"),
    ({"lmff": {"rank": 8}}, "'lmff'"),
    ({"lmf": {"rank": "many"}}, "invalid option 'lmf.rank' for fusion 'lmf'"),
    ({"lmf": 8}, "'lmf' must map option names to values"),
    ({"lmf": {"out_dim": 0}}, "'lmf.out_dim' must be a positive whole number"),
    ([1], "must map fusion method names to their options"),
])
def test_bad_method_options_name_the_method_and_option(tmp_path: Path, raw: object, message: str) -> None:
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load_method_options(path)
    assert message in str(error.value) and str(path) in str(error.value)


def _bench(synth_manifest: Path, tmp_path: Path, name: str, methods: dict[str, object]) -> list[dict[str, str]]:
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"manifest": str(synth_manifest), "batch_size": 64, "text": {"max_length": 8}},
        "encoders": {"text": {"name": "text_gru", "dim": 8}, "image": {"name": "image_cnn", "dim": 8, "channels": [4]}},
        "trainer": {"max_epochs": 1, "patience": None, "threads": 1},
    }))
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(methods))
    out = tmp_path / name
    result = CliRunner().invoke(app, ["bench", "-c", str(config), "--methods", "concat,lmf", "--seeds", "1",
                                      "--no-unimodal", "--out", str(out), "--methods-config",
                                      str(tmp_path / f"{name}.yaml")])
    assert result.exit_code == 0, result.output
    with (out / "runs.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_bench_trains_with_the_methods_options_and_writes_them_to_runs_csv(synth_manifest: Path,
                                                                            tmp_path: Path) -> None:
    low = {r["method"]: r for r in _bench(synth_manifest, tmp_path, "rank2", {"lmf": {"rank": 2}})}
    high = {r["method"]: r for r in _bench(synth_manifest, tmp_path, "rank6", {"lmf": {"rank": 6}})}
    assert json.loads(low["lmf"]["fusion_options"]) == {"out_dim": 128, "rank": 2}
    assert json.loads(high["lmf"]["fusion_options"]) == {"out_dim": 128, "rank": 6}
    assert json.loads(low["concat"]["fusion_options"]) == {"out_dim": 128}
    # the rank really reached the model: LMF's factors grow linearly with it, concat is untouched
    grown = int(high["lmf"]["params"]) - int(low["lmf"]["params"])
    assert grown > 0 and grown % 4 == 0
    assert low["concat"]["params"] == high["concat"]["params"]


def test_bench_refuses_an_unknown_option_before_training(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("mult: {head: 2}\n")
    result = CliRunner().invoke(app, ["bench", "--methods-config", str(tmp_path / "m.yaml"), "--out",
                                      str(tmp_path / "b")])
    assert result.exit_code == 1
    assert "unknown option 'mult.head' for fusion 'mult' (did you mean 'heads'?)" in " ".join(result.output.split())
    assert not (tmp_path / "b").exists()
