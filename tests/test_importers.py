"""``mmfuse data import``: every format from a tiny source in its published layout -> a usable manifest."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from importer_sources import (
    write_audiocaps,
    write_audioset,
    write_clotho,
    write_coco,
    write_hf_parquet,
    write_hf_saved,
    write_iemocap,
    write_karpathy,
    write_mmsa,
    write_multibench,
    write_vggsound,
    write_wav,
)
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.config import load_config
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.arrays import load_array
from mmfuse.datasets.importers import ImportOptions, run_import
from mmfuse.datasets.importers.clip_lists import video_modality_available
from mmfuse.datasets.importers.safe_pickle import RefusedGlobal, safe_load

runner = CliRunner()


def rows_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def report_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "import_report.json").read_text())


# ---- the restricted unpickler -------------------------------------------------------------------

class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "unaligned_50.pkl"
    path.write_bytes(pickle.dumps({"train": {"audio": _Exploit(marker)}}))
    with pytest.raises(RefusedGlobal, match=r"unaligned_50\.pkl: refused .*'(posix|os|nt)\.system'"):
        safe_load(path)
    assert not marker.exists()
    with pytest.raises(DataError, match="refused"):
        run_import("mmsa", path, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_legit_pickle_with_numpy_and_object_arrays_loads(tmp_path: Path) -> None:
    data = {"train": {"raw_text": np.array(["a b", "c"], dtype=object), "audio": np.arange(6.0).reshape(1, 2, 3),
                      "id": ["x$_$0"], "n": np.float32(2.5), "pair": (1, 2.0, b"z")}}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = safe_load(path)
        assert list(loaded["train"]["raw_text"]) == ["a b", "c"]
        np.testing.assert_array_equal(loaded["train"]["audio"], data["train"]["audio"])
        assert loaded["train"]["n"] == np.float32(2.5) and loaded["train"]["pair"] == (1, 2.0, b"z")


# ---- mmsa ---------------------------------------------------------------------------------------

def test_mmsa_unaligned_trims_padding_and_keeps_values(tmp_path: Path) -> None:
    source = write_mmsa(tmp_path / "unaligned_50.pkl", unaligned=True)
    report = run_import("mmsa", source, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert report.splits == {"test": 4, "train": 12, "val": 4} and report.read == 20
    data = safe_load(source)
    for row in rows:
        split = {"val": "valid"}.get(row["split"], row["split"])
        i = int(row["id"].rsplit("$_$", 1)[1])
        src = data[split]
        assert row["text"] == f"utterance {split[:2]} {i}"
        assert row["label"] == pytest.approx(float(src["regression_labels"][i]))
        audio = load_array(tmp_path / "out" / row["audio_features"])
        length = src["audio_lengths"][i]
        assert audio.shape == (length, 5)  # padding not fed as data
        np.testing.assert_array_equal(audio, src["audio"][i, :length])
        text = load_array(tmp_path / "out" / row["text_features"])
        assert text.shape == (int(src["text_bert"][i, 1].sum()), 10)
        assert load_array(tmp_path / "out" / row["vision_features"]).shape == (src["vision_lengths"][i], 4)
    config = load_config(tmp_path / "out" / "config.yaml")
    assert config.task.name == "sentiment"
    assert sorted(config.data.modalities) == ["audio", "text", "vision"]
    assert config.data.manifest == (tmp_path / "out" / "manifest.jsonl").resolve()


def test_mmsa_aligned_writes_one_array_per_split_with_row_references(tmp_path: Path) -> None:
    source = write_mmsa(tmp_path / "aligned_50.pkl", unaligned=False)
    data = pickle.loads(source.read_bytes())
    data["train"]["audio"][0, 0, 0] = np.inf  # MOSEI's COVAREP has such values
    data["train"]["text"] = np.ones_like(data["train"]["text"])
    del data["train"]["text_bert"], data["valid"]["text_bert"], data["test"]["text_bert"]
    source.write_bytes(pickle.dumps(data))
    report = run_import("mmsa", source, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    first = next(r for r in rows if r["id"] == "trvid$_$0")
    assert first["audio_features"] == "features/audio_train.npy#0"
    assert first["text_features"] == "features/text_train.npy#0"
    audio = load_array(tmp_path / "out" / first["audio_features"])
    assert audio.shape == (7, 5) and audio[0, 0] == 0.0  # inf set to 0, counted
    np.testing.assert_array_equal(audio[1:], data["train"]["audio"][0, 1:])
    assert any("audio (train): 1 NaN/inf" in note for note in report.notes)


def test_multibench_pickle_drops_empty_text_and_cuts_leading_padding(tmp_path: Path) -> None:
    source = write_multibench(tmp_path / "mosi_raw.pkl")
    report = run_import("mmsa", source, tmp_path / "out")
    assert report.skipped == {"MultiBench: text features all zero (its loader's drop_entry)": 1}
    assert report.splits == {"test": 3, "train": 4, "val": 3}
    assert report.notes == ["layout: MultiBench"]
    rows = {r["id"]: r for r in rows_of(tmp_path / "out")}
    data = safe_load(source)
    row = rows["trainvid_2"]
    assert row["label"] == pytest.approx(float(data["train"]["labels"][2, 0, 0]))
    vision = load_array(tmp_path / "out" / row["vision_features"])
    assert vision.shape == (4, 3)  # sample 2 had 2 leading zero steps
    np.testing.assert_array_equal(vision, data["train"]["vision"][2, 2:])
    assert "text" not in row  # MultiBench has no raw text


def test_mmsa_limit_and_bad_label(tmp_path: Path) -> None:
    source = write_mmsa(tmp_path / "u.pkl")
    data = pickle.loads(source.read_bytes())
    for split in data.values():  # CH-SIMS' per-modality scores
        split["regression_labels_A"] = split["regression_labels"] / 3
    data["train"]["regression_labels"][3] = np.nan
    source.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match=r"u\.pkl split 'train' row 3: label is nan"):
        run_import("mmsa", source, tmp_path / "a")
    report = run_import("mmsa", source, tmp_path / "b", ImportOptions(on_error="skip", limit=5))
    assert report.splits == {"test": 4, "train": 5, "val": 4}
    assert report.skipped == {"label is nan": 1}
    rows = {r["id"]: r for r in rows_of(tmp_path / "b")}
    assert "trvid$_$3" not in rows
    assert rows["trvid$_$1"]["label_A"] == pytest.approx(rows["trvid$_$1"]["label"] / 3, abs=1e-6)


# ---- coco-captions ------------------------------------------------------------------------------

def test_coco_captions_one_row_per_caption_with_the_image_as_group(tmp_path: Path) -> None:
    annotations = write_coco(tmp_path / "coco")
    report = run_import("coco-captions", annotations, tmp_path / "out",
                        ImportOptions(images=tmp_path / "coco" / "images"))
    rows = rows_of(tmp_path / "out")
    assert report.splits == {"train": 4, "val": 4} and report.read == 10
    assert report.skipped == {"image file not found": 2}  # image 3's two captions
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
        assert Path(row["image"]).is_file() and row["text"].startswith(f"A photo number {row['group']} take")
    assert {g: len(r) for g, r in by_group.items()} == {"1": 2, "2": 2, "10": 2, "11": 2}
    assert by_group["10"][0]["image"].endswith("images/val2017/000000000010.jpg")
    config = load_config(tmp_path / "out" / "config.yaml")
    assert config.task.name == "contrastive" and config.data.target_column == "group"


def test_coco_karpathy_splits_decide_and_unlisted_images_are_counted(tmp_path: Path) -> None:
    annotations = write_coco(tmp_path / "coco")
    karpathy = write_karpathy(tmp_path / "dataset_coco.json")
    report = run_import("coco-captions", annotations, tmp_path / "out",
                        ImportOptions(images=tmp_path / "coco" / "images", karpathy=karpathy))
    splits = {r["group"]: r["split"] for r in rows_of(tmp_path / "out")}
    assert splits == {"1": "train", "2": "train", "10": "test"}  # restval -> train; val image 10 -> test
    assert report.skipped == {"image not in the Karpathy split": 4}  # images 3 and 11


# ---- vggsound / audioset ------------------------------------------------------------------------

def test_vggsound_finds_clips_by_naming_convention_and_counts_missing(tmp_path: Path) -> None:
    csv_path = write_vggsound(tmp_path)
    report = run_import("vggsound", csv_path, tmp_path / "out", ImportOptions(media=tmp_path / "media"))
    rows = {r["id"]: r for r in rows_of(tmp_path / "out")}
    assert rows["aaaaaaaaaaa_1000"]["audio"].endswith("aaaaaaaaaaa_000001.wav")
    assert rows["aaaaaaaaaaa_1000"]["label"] == "dog barking" and rows["aaaaaaaaaaa_1000"]["split"] == "train"
    assert rows["bbbbbbbbbbb_30000"]["video"].endswith("video/bbbbbbbbbbb_000030.mp4")
    assert "audio" not in rows["bbbbbbbbbbb_30000"] and rows["bbbbbbbbbbb_30000"]["label"] == "people, crowd"
    assert rows["ddddddddddd_12000"]["audio"].endswith(".flac")
    assert report.skipped == {"clip not found in the media folder": 1}
    assert report.skipped_examples["clip not found in the media folder"] == [f"{csv_path} line 3"]
    config = load_config(tmp_path / "out" / "config.yaml")
    assert config.task.name == "classification"
    video = video_modality_available()
    assert sorted(config.data.modalities) == (["audio", "soundtrack", "video"] if video else ["audio"])


def test_video_only_clips_get_a_config_only_where_mmfuse_reads_video(tmp_path: Path) -> None:
    csv_path = write_vggsound(tmp_path)
    for path in (tmp_path / "media").glob("*.*"):
        path.unlink()  # only the .mp4 is left
    report = run_import("vggsound", csv_path, tmp_path / "out", ImportOptions(media=tmp_path / "media"))
    assert report.written == 1 and report.columns == ["id", "label", "split", "video"]
    if video_modality_available():
        assert report.config is not None
        assert load_config(report.config).data.modalities["soundtrack"].column == "video"
    else:
        assert report.config is None and not (tmp_path / "out" / "config.yaml").exists()
        assert any("no video modality" in note for note in report.notes)


def test_vggsound_bad_row_names_file_and_line(tmp_path: Path) -> None:
    csv_path = write_vggsound(tmp_path)
    with csv_path.open("a") as handle:
        handle.write("eeeeeeeeeee,soon,cat,train\n")
    with pytest.raises(DataError, match=r"vggsound\.csv line 5: start_seconds 'soon' is not a number"):
        run_import("vggsound", csv_path, tmp_path / "a", ImportOptions(media=tmp_path / "media"))
    report = run_import("vggsound", csv_path, tmp_path / "b", ImportOptions(media=tmp_path / "media", on_error="skip"))
    assert report.skipped["start_seconds 'soon' is not a number"] == 1 and report.written == 3


def test_audioset_multilabel_with_display_names(tmp_path: Path) -> None:
    root = write_audioset(tmp_path / "as")
    report = run_import("audioset-csv", root, tmp_path / "out",
                        ImportOptions(media=root / "clips", class_labels=root / "class_labels_indices.csv"))
    rows = {r["id"]: r for r in rows_of(tmp_path / "out")}
    assert rows["--PJHxphWEs_30000"]["label"] == ["Speech", "Gush"]
    assert rows["--aE2O5G5WE_0"]["label"] == ["Goat", "Music"] and rows["--aE2O5G5WE_0"]["audio"].endswith(".flac")
    assert rows["zzzzzzzzzzz_10000"]["split"] == "test"
    assert report.skipped == {"clip not found in the media folder": 1} and report.read == 4
    assert load_config(tmp_path / "out" / "config.yaml").task.name == "multilabel"


# ---- audiocaps / clotho -------------------------------------------------------------------------

def test_audiocaps_rows_per_caption_grouped_by_clip(tmp_path: Path) -> None:
    root = write_audiocaps(tmp_path / "ac")
    report = run_import("audiocaps", root, tmp_path / "out", ImportOptions(media=root / "audio"))
    rows = {r["id"]: r for r in rows_of(tmp_path / "out")}
    assert set(rows) == {"ac91139", "ac58146", "ac97151", "ac97152"}
    assert rows["ac58146"]["text"] == "Multiple clanging, banging sounds"
    assert rows["ac97151"]["group"] == rows["ac97152"]["group"] == "rqfQRErjfk8_170000"
    assert rows["ac97152"]["audio"] == rows["ac97151"]["audio"]
    assert report.splits == {"train": 2, "val": 2} and report.skipped == {"clip not found in the media folder": 1}


def test_clotho_five_captions_per_clip(tmp_path: Path) -> None:
    root = write_clotho(tmp_path / "clotho")
    report = run_import("clotho", root, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert report.splits == {"test": 5, "train": 5} and report.skipped == {"clip not found in the media folder": 1}
    forest = [r for r in rows if r["group"] == "development/Forest ambience.wav"]
    assert [r["text"] for r in forest] == ["Birds sing, wind blows", "Birds chirp", "Leaves rustle", "A bird calls",
                                          "Wind in trees"]
    assert all(r["split"] == "train" and r["audio"].endswith("development/Forest ambience.wav") for r in forest)
    assert load_config(tmp_path / "out" / "config.yaml").data.target_column == "group"


# ---- iemocap ------------------------------------------------------------------------------------

def test_iemocap_four_classes_by_session(tmp_path: Path) -> None:
    root = write_iemocap(tmp_path / "IEMOCAP_full_release")
    report = run_import("iemocap", root, tmp_path / "out")
    rows = {r["id"]: r for r in rows_of(tmp_path / "out")}
    assert {k: (r["label"], r["split"]) for k, r in rows.items()} == {
        "Ses01F_impro01_F000": ("neutral", "train"), "Ses01F_impro01_M001": ("happy", "train"),
        "Ses01F_impro01_F004": ("angry", "train"), "Ses05F_impro01_F000": ("sad", "test"),
        "Ses05F_impro01_M001": ("happy", "test")}
    assert rows["Ses01F_impro01_F000"]["text"] == "Sentence 1 0."
    wav = "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    assert rows["Ses01F_impro01_F000"]["audio"].endswith(wav)
    assert rows["Ses01F_impro01_F004"]["audio"] is None  # wav missing: kept, text only
    assert report.skipped == {"class 'frustrated' not in the 4-class set": 1, "no majority emotion (xxx)": 1,
                              "class 'surprised' not in the 4-class set": 1}
    assert report.missing == {"audio (wav not found)": 1}
    everything = run_import("iemocap", tmp_path, tmp_path / "all", ImportOptions(all_classes=True, test_session=1))
    labels = {r["id"]: (r["label"], r["split"]) for r in rows_of(tmp_path / "all")}
    assert labels["Ses01F_impro01_M001"] == ("excited", "test") and labels["Ses05F_impro01_F002"] == ("surprised",
                                                                                                     "train")
    assert everything.skipped == {"no majority emotion (xxx)": 1}


# ---- hf-datasets --------------------------------------------------------------------------------

def test_hf_save_to_disk_writes_images_and_class_names(tmp_path: Path) -> None:
    root = write_hf_saved(tmp_path / "hf")
    report = run_import("hf-datasets", root, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert report.splits == {"train": 4, "val": 2}
    assert [r["label"] for r in rows if r["split"] == "train"] == ["cat", "dog", "cat", None]  # -1: no label
    first = rows[0]
    assert first["image"] == "media/train/0.png" and first["text"] == "train 0"
    from PIL import Image

    with Image.open(tmp_path / "out" / rows[1]["image"]) as image:
        assert image.getpixel((0, 0)) == (50, 0, 0)
    config = load_config(tmp_path / "out" / "config.yaml")
    assert sorted(config.data.modalities) == ["image", "text"] and config.task.name == "classification"
    single = run_import("hf-datasets", root / "validation", tmp_path / "single")  # Dataset.save_to_disk
    assert single.splits == {"val": 2} and single.written == 2  # state.json's _split


def test_hf_parquet_audio_with_chosen_columns(tmp_path: Path) -> None:
    import soundfile as sf

    root = write_hf_parquet(tmp_path / "hfp")
    report = run_import("hf-datasets", root, tmp_path / "out", ImportOptions(label_column="intent"))
    rows = [r for r in rows_of(tmp_path / "out") if r["id"] == "train-101"]
    assert report.splits == {"test": 2, "train": 3}
    assert rows[0] == {"id": "train-101", "split": "train", "audio": "media/train/1.flac", "text": "say 1",
                       "label": 1.0}
    samples, rate = sf.read(tmp_path / "out" / rows[0]["audio"])
    assert rate == 8000 and samples.shape == (800,) and samples[0] == pytest.approx(0.2, abs=1e-3)
    assert load_config(tmp_path / "out" / "config.yaml").task.name == "regression"
    with pytest.raises(DataError, match="no column 'nope' for --text-column; columns: id, audio, sentence, intent"):
        run_import("hf-datasets", root, tmp_path / "bad", ImportOptions(text_column="nope"))


# ---- dispatch and the CLI -----------------------------------------------------------------------

def test_options_that_do_not_apply_and_unknown_formats_are_errors(tmp_path: Path) -> None:
    source = write_mmsa(tmp_path / "u.pkl")
    with pytest.raises(ConfigError, match="--images does not apply to format 'mmsa'"):
        run_import("mmsa", source, tmp_path / "o", ImportOptions(images=tmp_path))
    with pytest.raises(ConfigError, match=r"unknown import format 'cocos'.*did you mean 'coco-captions'"):
        run_import("cocos", source, tmp_path / "o")


def test_cli_import_prints_the_summary_and_refuses_a_non_empty_out(tmp_path: Path) -> None:
    root = write_iemocap(tmp_path / "iemocap")
    out = tmp_path / "out"
    result = runner.invoke(app, ["data", "import", "iemocap", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "read 8 source rows, wrote 5 manifest rows (test 2, train 3)" in result.output
    assert "skipped 1: no majority emotion (xxx)" in result.output and "train with: mmfuse train -c" in result.output
    assert report_of(out)["written"] == 5
    result = runner.invoke(app, ["data", "import", "iemocap", str(root), "--out", str(out)])
    assert result.exit_code == 1 and "is not empty" in result.output and "--overwrite" in result.output
    result = runner.invoke(app, ["data", "import", "iemocap", str(root), "--out", str(out), "--overwrite",
                                 "--all-classes"])
    assert result.exit_code == 0, result.output
    assert report_of(out)["written"] == 7
    result = runner.invoke(app, ["data", "import", "iemocap", str(root), "--out", str(tmp_path / "x"),
                                 "--media", str(root)])
    assert result.exit_code == 1 and "--media does not apply to format 'iemocap'" in result.output


def test_an_imported_mmsa_set_trains_through_the_normal_config_path(tmp_path: Path) -> None:
    source = write_mmsa(tmp_path / "unaligned_50.pkl", sizes=(48, 12, 12))
    result = runner.invoke(app, ["data", "import", "mmsa", str(source), "--out", str(tmp_path / "mosi")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "-c", str(tmp_path / "mosi" / "config.yaml"), "--out", str(tmp_path / "run"),
                                 "--set", "trainer.max_epochs=1", "--set", "trainer.progress_bar=false"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test = metrics["test"]
    for name in ("mae", "pearson", "acc2", "acc2_nonzero", "f1", "f1_nonzero", "acc7"):
        assert np.isfinite(test[name]), name
    assert 0.0 <= test["acc2"] <= 1.0 and test["mae"] > 0


def test_an_imported_coco_set_trains_contrastive_with_the_image_as_label(tmp_path: Path) -> None:
    annotations = write_coco(tmp_path / "coco")
    run_import("coco-captions", annotations, tmp_path / "out", ImportOptions(images=tmp_path / "coco" / "images"))
    result = runner.invoke(app, ["train", "-c", str(tmp_path / "out" / "config.yaml"), "--out", str(tmp_path / "run"),
                                 "--set", "trainer.max_epochs=1", "--set", "trainer.progress_bar=false",
                                 "--set", "data.image.size=16"])
    assert result.exit_code == 0, result.output
    val = json.loads((tmp_path / "run" / "metrics.json").read_text())["val"]
    # Four captions of two images: class-level recall (any caption of the image) is reported.
    assert 0.0 <= val["mean_class_recall"] <= 1.0
    for direction in ("image_to_text", "text_to_image"):  # counting any caption can only help
        assert val[f"{direction}_class_r1"] >= val[f"{direction}_r1"]


def test_an_imported_clip_list_with_audio_and_video_files_trains(tmp_path: Path) -> None:
    lines = []
    for i in range(24):
        ytid = f"clip{i:07d}"
        if i % 6 == 5:  # a video file (not decodable here: counted by data.on_error=skip, never fatal)
            (tmp_path / "media").mkdir(exist_ok=True)
            (tmp_path / "media" / f"{ytid}_000000.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
        else:
            write_wav(tmp_path / "media" / f"{ytid}_000000.wav", seconds=0.2)
        lines.append(f"{ytid},0,{'low' if i % 2 else 'high'},{'test' if i >= 18 else 'train'}")
    (tmp_path / "vggsound.csv").write_text("\n".join(lines) + "\n")
    report = run_import("vggsound", tmp_path / "vggsound.csv", tmp_path / "out",
                        ImportOptions(media=tmp_path / "media"))
    assert report.splits == {"test": 6, "train": 18} and report.config is not None
    result = runner.invoke(app, ["train", "-c", report.config, "--out", str(tmp_path / "run"),
                                 "--set", "trainer.max_epochs=1", "--set", "trainer.progress_bar=false",
                                 "--set", "data.audio.max_seconds=0.5"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped"] == {"train": 3, "test": 1}  # the four video rows
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
