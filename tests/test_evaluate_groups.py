"""``mmfuse evaluate --by COLUMN``: a group's metrics are the metrics of its rows evaluated alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmfuse.analysis.groups import MISSING_GROUP, manifest_groups
from mmfuse.cli import app
from mmfuse.config import validate_config
from mmfuse.core.errors import DataError
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit


@pytest.fixture(scope="module")
def model_dir(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("groups") / "run"
    config = validate_config({
        "seed": 0,
        "data": {"manifest": str(synth_manifest), "target_column": "pitch", "batch_size": 32,
                 "text": {"max_length": 12}, "audio": {"n_mels": 16, "n_fft": 256, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [4, 8]}},
        "fusion": {"name": "concat", "out_dim": 16},
        "optim": {"lr": 0.01},
        "trainer": {"max_epochs": 3, "patience": None, "output_dir": str(out), "progress_bar": False, "threads": 1},
    })
    fit(config, prepare_data(config))
    return out / "model"


def _rows(manifest: Path) -> list[dict[str, Any]]:
    """The synthetic rows with absolute file paths and 'colour' removed from every 7th row."""
    rows = []
    for i, line in enumerate(manifest.read_text().splitlines()):
        row = json.loads(line)
        row.update(image=str(manifest.parent / row["image"]), audio=str(manifest.parent / row["audio"]))
        if i % 7 == 0:
            del row["colour"]
        elif i % 7 == 1:
            row["colour"] = ""
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _evaluate(*args: str) -> Any:
    result = CliRunner().invoke(app, ["evaluate", *args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    return result


def test_group_metrics_equal_each_group_evaluated_alone(model_dir: Path, synth_manifest: Path,
                                                        tmp_path: Path) -> None:
    rows = _rows(synth_manifest)
    manifest = _write(tmp_path / "all.jsonl", rows)
    result = _evaluate("-m", str(model_dir), "-d", str(manifest), "--by", "colour", "--json", str(tmp_path / "m.json"))
    assert "by colour" in result.output and MISSING_GROUP in result.output
    summary = json.loads((tmp_path / "m.json").read_text())
    groups = summary["groups"]
    assert groups["column"] == "colour"
    expected = {}
    for row in rows:
        expected.setdefault(row.get("colour") or MISSING_GROUP, []).append(row)
    assert list(groups["values"]) == [*sorted(set(expected) - {MISSING_GROUP}), MISSING_GROUP]
    assert {g: v["samples"] for g, v in groups["values"].items()} == {g: len(r) for g, r in expected.items()}
    assert sum(v["samples"] for v in groups["values"].values()) == len(rows) == 160
    assert "accuracy" in summary and "loss" in summary  # the overall metrics stay at the top level

    for group, members in expected.items():
        alone = tmp_path / f"alone-{len(members)}.json"
        _evaluate("-m", str(model_dir), "-d", str(_write(tmp_path / "g.jsonl", members)), "--json", str(alone))
        assert groups["values"][group]["metrics"] == pytest.approx(json.loads(alone.read_text()), abs=1e-6)
    # The groups really differ from the whole set: they are not the overall metrics copied.
    accuracies = {v["metrics"]["accuracy"] for v in groups["values"].values()}
    assert len(accuracies) > 1


def test_unknown_group_column_names_it_and_the_closest(model_dir: Path, synth_manifest: Path, tmp_path: Path) -> None:
    manifest = _write(tmp_path / "all.jsonl", _rows(synth_manifest))
    result = CliRunner().invoke(app, ["evaluate", "-m", str(model_dir), "-d", str(manifest), "--by", "colur",
                                      "--threads", "1"])
    assert result.exit_code == 1
    assert "no column 'colur' to group by (did you mean 'colour'?)" in " ".join(result.output.split())
    with pytest.raises(DataError, match="no column 'speaker'"):
        manifest_groups(manifest, "speaker")


def test_numeric_group_values_read_as_written(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,text,label,year\na,x,1,2020\nb,y,0,\nc,z,1,2021\n")
    assert manifest_groups(manifest, "year") == {"a": "2020", "b": MISSING_GROUP, "c": "2021"}
    jsonl = _write(tmp_path / "m.jsonl", [{"id": "a", "n": 3.0}, {"id": "b", "n": 2.5}, {"id": "c", "n": None}])
    assert manifest_groups(jsonl, "n") == {"a": "3", "b": "2.5", "c": MISSING_GROUP}


def test_robustness_by_group_writes_each_groups_subsets_and_importance(model_dir: Path, synth_manifest: Path,
                                                                       tmp_path: Path) -> None:
    rows = [r for r in _rows(synth_manifest) if r.get("colour") in ("red", "blue") or "colour" not in r]
    manifest = _write(tmp_path / "some.jsonl", rows)
    out = tmp_path / "rob"
    _evaluate("-m", str(model_dir), "-d", str(manifest), "--by", "colour", "--json", str(tmp_path / "m.json"),
              "--robustness", "--out", str(out), "--levels", "2", "--corruptions", "word_dropout")
    groups = json.loads((tmp_path / "m.json").read_text())["groups"]["values"]
    with (out / "missing_subsets_by_colour.csv").open() as handle:
        subsets = list(csv.DictReader(handle))
    assert {r["colour"] for r in subsets} == set(groups) == {"blue", "red", MISSING_GROUP}
    for group, value in groups.items():
        mine = {r["present"]: r for r in subsets if r["colour"] == group}
        assert set(mine) == {"audio+text", "audio", "text", "none"}
        assert int(mine["audio+text"]["samples"]) == value["samples"]
        # all modalities present = the plain evaluation of the group
        assert float(mine["audio+text"]["accuracy"]) == pytest.approx(value["metrics"]["accuracy"], abs=1e-4)
    with (out / "importance_by_colour.csv").open() as handle:
        importance = list(csv.DictReader(handle))
    assert sorted((r["colour"], r["modality"]) for r in importance) == sorted(
        (g, m) for g in groups for m in ("audio", "text"))
    for group in groups:  # Shapley efficiency: the values sum to v(all) - v(none), per group
        mine = {r["present"]: float(r["accuracy"]) for r in subsets if r["colour"] == group}
        total = sum(float(r["shapley"]) for r in importance if r["colour"] == group)
        assert total == pytest.approx(mine["audio+text"] - mine["none"], abs=2e-4)
