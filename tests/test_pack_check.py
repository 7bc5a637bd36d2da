"""The check that a pack matches its config, read in memory that does not grow with the data set
(``mmfuse.engine.pack_check``): the same digests as the full fingerprint, no split held in memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mmfuse.config import ExperimentConfig, validate_config
from mmfuse.core.errors import DataError
from mmfuse.engine import pack_check
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_fingerprint import fingerprint
from mmfuse.engine.pack_open import open_pack
from mmfuse.engine.records import load_records, new_preprocessor


def config_for(**data: object) -> ExperimentConfig:
    return validate_config({
        "seed": 3,
        "data": {"target_column": "pitch", "batch_size": 16, "text": {"max_length": 12}, "image": {"size": 16},
                 "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}, **data},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "image": {"name": "image_cnn", "dim": 16, "channels": [8]},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [8, 16]}},
        "fusion": {"name": "concat", "out_dim": 16, "proj_dim": 16, "hidden": 16},
        "trainer": {"max_epochs": 1, "patience": None, "progress_bar": False, "threads": 1},
    })


@pytest.fixture
def layouts(synth_manifest: Path, tmp_path: Path) -> dict[str, ExperimentConfig]:
    """The ways splits are given: a split column with val, one without (val carved out of train by seed),
    separate CSV manifests per split."""
    rows = [json.loads(line) for line in synth_manifest.read_text().splitlines()]
    no_val = tmp_path / "no_val.jsonl"
    no_val.write_text("".join(json.dumps({**r, "split": "test" if r["split"] == "test" else "train"}) + "\n"
                              for r in rows))
    folder = synth_manifest.parent
    for split in ("train", "val", "test"):
        pd.DataFrame([r for r in rows if r["split"] == split]).to_csv(folder / f"{split}.csv", index=False)
    return {
        "split column": config_for(manifest=str(synth_manifest)),
        "val carved from train": config_for(manifest=str(no_val), val_fraction=0.3),
        "separate CSVs": config_for(train=str(folder / "train.csv"), val=str(folder / "val.csv"),
                                    test=str(folder / "test.csv")),
    }


def test_streamed_record_digests_equal_the_fingerprints(layouts: dict[str, ExperimentConfig]) -> None:
    for name, config in layouts.items():
        splits = load_records(config)
        full, _ = fingerprint(config, splits, new_preprocessor(config))
        assert pack_check.record_digests(config) == full["records"], name
    carved = load_records(layouts["val carved from train"])
    assert len(carved["val"]) == 43 and len(carved["train"]) == 101  # round(144 * 0.3) by seed 3


def test_the_file_list_is_read_entry_by_entry_in_any_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [[f"/data/{'é' * i}clip {i}.wav", "ab" * 32 if i % 3 else None, [1, i, 2, 3, 4] if i % 4 else None]
               for i in range(40)]
    monkeypatch.setattr(pack_check, "CHUNK", 7)  # entries cut across many reads
    for text in (json.dumps(entries), "[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n", "[]"):
        (tmp_path / "files.json").write_text(text, encoding="utf-8")
        assert list(pack_check.file_entries(tmp_path)) == (entries if text != "[]" else [])
    for broken in (json.dumps(entries)[:-40], '{"a": 1}', "[[1, 2]]"):
        (tmp_path / "files.json").write_text(broken)
        with pytest.raises(ValueError, match=r"files\.json"):
            list(pack_check.file_entries(tmp_path))


def test_opening_a_matching_pack_holds_no_split_in_memory(synth_manifest: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for(manifest=str(synth_manifest))
    pack_data(config, tmp_path / "pack", workers=1, shard_size=50)

    def refused(*_: object) -> None:
        raise AssertionError("the whole record lists were loaded")

    with monkeypatch.context() as patch:
        patch.setattr(pack_check, "load_records", refused)
        assert len(open_pack(config, tmp_path / "pack").datasets["train"]) == 128
    (tmp_path / "pack" / "files.json").write_text("[[")  # unreadable list: the full comparison still answers
    assert len(open_pack(config, tmp_path / "pack").datasets["val"]) == 16


def test_a_changed_manifest_row_or_a_missing_file_is_named(synth_manifest: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_manifest.parent, data)
    manifest = data / synth_manifest.name
    config = config_for(manifest=str(manifest), check_sources=True)  # as `mmfuse train --check-sources`
    pack_data(config, tmp_path / "pack", workers=1, shard_size=50)
    image = sorted((data / "images").glob("*.png"))[3]
    image.rename(image.with_suffix(".bak"))
    open_pack(config_for(manifest=str(manifest)), tmp_path / "pack")  # by default the raw files are not read
    with pytest.raises(DataError, match=rf"input files changed since packing: .*{image.name}"):
        open_pack(config, tmp_path / "pack")
    image.with_suffix(".bak").rename(image)
    open_pack(config, tmp_path / "pack")
    rows = manifest.read_text().splitlines()
    edited = json.loads(rows[-1])
    edited["text"] = edited["text"] + " again"
    manifest.write_text("\n".join([*rows[:-1], json.dumps(edited)]) + "\n")
    with pytest.raises(DataError, match=rf"the manifest rows of {edited['split']} differ"):
        open_pack(config, tmp_path / "pack")
