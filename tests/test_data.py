"""Manifests, preprocessing, the dataset and the collator, on small real files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmfuse.config import AudioPrep, ImagePrep, ModalitySpec, TextPrep
from mmfuse.core.errors import DataError
from mmfuse.data.audio import SILENCE_LOG_MEL
from mmfuse.data.dataset import Collator, MultimodalDataset, Sample, build_sample
from mmfuse.data.manifest import Record, read_manifest
from mmfuse.data.preprocess import Preprocessor
from mmfuse.tasks.classification import ClassificationTask, MultilabelTask
from mmfuse.tasks.regression import RegressionTask

MODALITIES = {
    "text": ModalitySpec(kind="text", column="text"),
    "image": ModalitySpec(kind="image", column="image"),
    "audio": ModalitySpec(kind="audio", column="audio"),
}
SR = 16000


# ---------------------------------------------------------------------------------------- helpers


def write_png(path: Path, colour: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (40, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_wav(path: Path, seconds: float = 0.5, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * SR)) / SR
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR, subtype="PCM_16")
    return path


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def fitted(records: list[Record], **prep: Any) -> Preprocessor:
    pre = Preprocessor(MODALITIES, TextPrep(), prep.get("image", ImagePrep()), prep.get("audio", AudioPrep()))
    pre.fit(records)
    return pre


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """A data folder with two images and two clips (0.5 s and 1 s)."""
    write_png(tmp_path / "images" / "red.png", (255, 0, 0))
    write_png(tmp_path / "images" / "blue.png", (0, 0, 255), size=(32, 32))
    write_wav(tmp_path / "audio" / "short.wav", 0.5)
    write_wav(tmp_path / "audio" / "long.wav", 1.0)
    return tmp_path


TABLE = [
    {"id": "a", "text": "The cat sat", "image": "images/red.png", "audio": "audio/short.wav", "label": "cat"},
    {"id": "b", "text": "a dog barked loudly", "image": None, "audio": "audio/long.wav", "label": "dog"},
    {"id": "c", "text": None, "image": "images/blue.png", "audio": None, "label": "cat"},
]


# --------------------------------------------------------------------------------------- manifest


def test_jsonl_csv_parquet_give_identical_records(media: Path) -> None:
    results = []
    for suffix in (".jsonl", ".csv", ".parquet"):
        manifest = write_manifest(media / f"manifest{suffix}", TABLE)
        records = read_manifest(manifest, MODALITIES)
        results.append([(r.row, r.id, r.fields, r.target, r.split) for r in records])
        assert all(r.source == manifest.resolve() for r in records)
    assert results[0] == results[1] == results[2]
    base = media.resolve()
    assert results[0] == [
        (1, "a", {"text": "The cat sat", "image": str(base / "images/red.png"),
                  "audio": str(base / "audio/short.wav")}, "cat", None),
        (2, "b", {"text": "a dog barked loudly", "image": None, "audio": str(base / "audio/long.wav")}, "dog", None),
        (3, "c", {"text": None, "image": str(base / "images/blue.png"), "audio": None}, "cat", None),
    ]


def test_numeric_ids_read_the_same_in_every_format(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"t{i}", "label": "x"} for i in (7, 8)]
    mods = {"text": MODALITIES["text"]}
    for suffix in (".jsonl", ".csv", ".parquet"):
        records = read_manifest(write_manifest(tmp_path / f"m{suffix}", rows), mods)
        assert [r.id for r in records] == ["7", "8"], suffix


def test_paths_resolve_against_the_manifest_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = write_png(tmp_path / "elsewhere" / "x.png").resolve()
    manifest = write_manifest(tmp_path / "data" / "m.jsonl", [
        {"id": "rel", "text": "images/not_a_path.png", "image": "images/a.png", "audio": "../clips/b.wav"},
        {"id": "abs", "text": "t", "image": str(elsewhere), "audio": None},
    ])
    monkeypatch.chdir(tmp_path / "elsewhere")
    rel, absolute = read_manifest(Path("../data/m.jsonl"), MODALITIES, target_column=None)
    folder = (tmp_path / "data").resolve()
    assert rel.fields["image"] == str(folder / "images/a.png")
    assert rel.fields["audio"] == str(folder / "../clips/b.wav")
    assert rel.fields["text"] == "images/not_a_path.png"  # text is never treated as a path
    assert absolute.fields["image"] == str(elsewhere)
    assert rel.source == manifest.resolve()
    assert rel.target is None and absolute.target is None


def test_null_nan_empty_and_blank_fields_are_absent(tmp_path: Path) -> None:
    lines = [
        '{"id": "a", "text": null, "image": NaN, "audio": "", "label": "x"}',
        '{"id": "b", "text": "   ", "image": "\\t", "audio": null, "label": "x"}',
        '{"id": "c", "text": "kept", "audio": "a.wav", "label": "x"}',  # "image" key absent in this row
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = read_manifest(tmp_path / "m.jsonl", MODALITIES)
    assert [r.fields for r in jsonl[:2]] == [dict.fromkeys(MODALITIES)] * 2
    assert jsonl[2].fields == {"text": "kept", "image": None, "audio": str(tmp_path.resolve() / "a.wav")}

    rows = [
        {"id": "a", "text": None, "image": "", "audio": "  ", "label": "x"},
        {"id": "b", "text": float("nan"), "image": " \t", "audio": None, "label": "x"},
        {"id": "c", "text": "kept", "image": "i.png", "audio": None, "label": "x"},
    ]
    for suffix in (".csv", ".parquet"):
        records = read_manifest(write_manifest(tmp_path / f"m{suffix}", rows), MODALITIES)
        assert [r.fields for r in records[:2]] == [dict.fromkeys(MODALITIES)] * 2, suffix
        assert records[2].fields["text"] == "kept"


def test_empty_label_is_no_target_in_every_format(tmp_path: Path) -> None:
    rows = [{"id": "a", "text": "t", "label": ""}, {"id": "b", "text": "t", "label": "  "},
            {"id": "c", "text": "t", "label": None}, {"id": "d", "text": "t", "label": "dog"}]
    for suffix in (".jsonl", ".csv", ".parquet"):
        records = read_manifest(write_manifest(tmp_path / f"m{suffix}", rows), {"text": MODALITIES["text"]})
        assert [r.target for r in records] == [None, None, None, "dog"], suffix


def test_list_targets_read_as_lists_in_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "text": "t", "tags": ["p", "q"], "y": [1.0, 2.0]},
        {"id": "b", "text": "u", "tags": ["q"], "y": [3.0, 4.0]},
    ]
    mods = {"text": MODALITIES["text"]}
    for suffix in (".jsonl", ".parquet"):
        manifest = write_manifest(tmp_path / f"m{suffix}", rows)
        tags = [r.target for r in read_manifest(manifest, mods, target_column="tags")]
        assert tags == [["p", "q"], ["q"]] and all(type(t) is list for t in tags), suffix
        multi = MultilabelTask()
        multi.fit(tags)
        assert multi.labels == ["p", "q"]
        values = [r.target for r in read_manifest(manifest, mods, target_column="y")]
        assert RegressionTask(num_targets=2).encode_target(values[1]).tolist() == [3.0, 4.0], suffix


def test_split_column_is_read_and_stripped(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "a", "text": "t", "label": "x", "split": " train "},
        {"id": "b", "text": "t", "label": "x", "split": None},
    ])
    records = read_manifest(manifest, {"text": MODALITIES["text"]}, split_column="split")
    assert [r.split for r in records] == ["train", None]
    with pytest.raises(DataError, match="no column 'fold'"):
        read_manifest(manifest, {"text": MODALITIES["text"]}, split_column="fold")


def test_missing_modality_column_names_it_and_suggests_the_closest(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "a", "text": "t", "imgae": "x.png", "audio": "", "label": 1}])
    with pytest.raises(DataError, match=r"no column 'image' \(did you mean 'imgae'\?\)") as info:
        read_manifest(manifest, MODALITIES)
    assert "m.csv" in str(info.value)
    no_label = write_manifest(tmp_path / "n.jsonl", [{"id": "a", "text": "t", "lable": "x"}])
    with pytest.raises(DataError, match=r"no column 'label' \(did you mean 'lable'\?\)"):
        read_manifest(no_label, {"text": MODALITIES["text"]})
    # the target column is only required when targets are asked for
    assert read_manifest(no_label, {"text": MODALITIES["text"]}, target_column=None)[0].target is None


@pytest.mark.parametrize("name, content", [("m.jsonl", ""), ("m.jsonl", "\n\n"), ("m.csv", "id,text,label\n")])
def test_empty_manifest_is_an_error(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=r"no rows|cannot read"):
        read_manifest(tmp_path / name, {"text": MODALITIES["text"]})


def test_missing_manifest_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest not found: .*nope\.jsonl"):
        read_manifest(tmp_path / "nope.jsonl", MODALITIES)


def test_invalid_json_line_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "t", "label": "x"}\n\n{"id": "b", "text": \n')
    with pytest.raises(DataError, match=r"m.jsonl line 3: not valid JSON"):
        read_manifest(tmp_path / "m.jsonl", {"text": MODALITIES["text"]})
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "t", "label": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        read_manifest(tmp_path / "m.jsonl", {"text": MODALITIES["text"]})


def test_duplicate_id_names_the_row(tmp_path: Path) -> None:
    rows = [{"id": i, "text": "t", "label": "x"} for i in ("a", "b", "a")]
    for suffix in (".jsonl", ".csv"):
        with pytest.raises(DataError, match=rf"m{suffix} row 3: duplicate id 'a'"):
            read_manifest(write_manifest(tmp_path / f"m{suffix}", rows), {"text": MODALITIES["text"]})


def test_rows_without_id_are_numbered(tmp_path: Path) -> None:
    rows = [{"text": "t", "label": "x"}, {"id": "", "text": "u", "label": "y"}]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    assert [r.id for r in read_manifest(manifest, {"text": MODALITIES["text"]})] == ["0", "1"]


def test_unsupported_suffix_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text("id,text\na,t\n")
    with pytest.raises(DataError, match=r"unsupported manifest type '\.txt'.*\.jsonl"):
        read_manifest(tmp_path / "m.txt", {"text": MODALITIES["text"]})


# ------------------------------------------------------------------------------------ preprocessor


def test_fit_builds_one_tokenizer_per_text_modality(tmp_path: Path) -> None:
    mods = {"title": ModalitySpec(kind="text", column="title"), "body": ModalitySpec(kind="text", column="body"),
            "image": MODALITIES["image"]}
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "a", "title": "Big news", "body": "the cat sat", "image": None, "label": "x"},
        {"id": "b", "title": None, "body": "the dog ran", "image": "i.png", "label": "y"},
    ])
    pre = Preprocessor(mods, TextPrep(), ImagePrep(), AudioPrep())
    pre.fit(read_manifest(manifest, mods))
    assert list(pre.modalities) == ["body", "image", "title"]  # sorted
    assert set(pre.tokenizers) == {"body", "title"}
    assert pre.tokenizers["title"].vocab == ["[PAD]", "[UNK]", "big", "news"]
    assert pre.tokenizers["body"].vocab == ["[PAD]", "[UNK]", "the", "cat", "dog", "ran", "sat"]


def test_encode_shapes_and_values(media: Path) -> None:
    records = read_manifest(write_manifest(media / "m.jsonl", TABLE), MODALITIES)
    pre = fitted(records)
    tok = pre.tokenizers["text"]
    text = pre.encode("text", "the cat barked")
    assert text is not None and text["input_ids"].dtype == torch.long
    assert text["input_ids"].tolist() == [tok.vocab.index("the"), tok.vocab.index("cat"), tok.vocab.index("barked")]
    assert pre.encode("text", "zzz")["input_ids"].tolist() == [1]  # type: ignore[index]
    assert pre.encode("text", "   ") is None  # no tokens: the caller treats the modality as absent

    pixels = pre.encode("image", str(media / "images/red.png"))["pixels"]  # type: ignore[index]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[0], torch.ones(32, 32)) and torch.allclose(pixels[1:], -torch.ones(2, 32, 32))

    short = pre.encode("audio", str(media / "audio/short.wav"))["mel"]  # type: ignore[index]
    long = pre.encode("audio", str(media / "audio/long.wav"))["mel"]  # type: ignore[index]
    assert short.shape == (40, 8000 // 160 + 1) and long.shape == (40, pre.audio.max_frames) == (40, 101)
    write_wav(media / "audio/three.wav", 3.0)
    assert pre.encode("audio", str(media / "audio/three.wav"))["mel"].shape == (40, 101)  # type: ignore[index]

    grey = fitted(records, image=ImagePrep(mode="grayscale", size=16), audio=AudioPrep(n_mels=20, hop_length=320))
    assert grey.encode("image", str(media / "images/red.png"))["pixels"].shape == (1, 16, 16)  # type: ignore[index]
    assert grey.encode("audio", str(media / "audio/long.wav"))["mel"].shape == (20, 51)  # type: ignore[index]

    encoded = pre.encode_record(records[2])
    assert encoded["text"] is None and encoded["audio"] is None and encoded["image"] is not None


def test_context_values(media: Path) -> None:
    records = read_manifest(write_manifest(media / "m.jsonl", TABLE), MODALITIES)
    pre = Preprocessor(MODALITIES, TextPrep(max_length=12), ImagePrep(size=24, mode="grayscale"),
                       AudioPrep(n_mels=32, max_seconds=2.0))
    with pytest.raises(DataError, match="'text' has no fitted vocabulary"):
        pre.context("text")
    pre.fit(records)
    text = pre.context("text")
    assert (text.kind, text.vocab_size, text.max_length) == ("text", pre.tokenizers["text"].vocab_size, 12)
    assert text.vocab_size == 2 + 7  # [PAD], [UNK] + the, cat, sat, a, dog, barked, loudly
    image = pre.context("image")
    assert (image.kind, image.channels, image.image_size) == ("image", 1, 24)
    audio = pre.context("audio")
    assert (audio.kind, audio.n_mels, audio.max_frames) == ("audio", 32, 2 * 16000 // 160 + 1)


def test_state_round_trip_encodes_identically(media: Path) -> None:
    records = read_manifest(write_manifest(media / "m.jsonl", TABLE), MODALITIES)
    pre = Preprocessor(MODALITIES, TextPrep(max_length=5, min_freq=1), ImagePrep(size=20, mean=0.4, std=0.2),
                       AudioPrep(n_mels=24, max_seconds=0.75))
    pre.fit(records)
    state = json.loads(json.dumps(pre.state()))  # must survive JSON, as it does in a saved model
    restored = Preprocessor.from_state(state)
    assert restored.state() == pre.state()
    assert restored.tokenizers["text"].vocab == pre.tokenizers["text"].vocab
    for record in records:
        a, b = pre.encode_record(record), restored.encode_record(record)
        assert a.keys() == b.keys()
        for modality in a:
            assert (a[modality] is None) == (b[modality] is None)
            for key in a[modality] or {}:
                assert torch.equal(a[modality][key], b[modality][key])  # type: ignore[index]


# ------------------------------------------------------------------------------- dataset / samples


def bad_table(media: Path) -> list[dict[str, Any]]:
    (media / "audio" / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio")
    return [
        {"id": "ok", "text": "the cat", "image": "images/red.png", "audio": "audio/short.wav", "label": "cat"},
        {"id": "noimg", "text": "the cat", "image": "images/missing.png", "audio": None, "label": "cat"},
        {"id": "badwav", "text": None, "image": None, "audio": "audio/corrupt.wav", "label": "dog"},
        {"id": "empty", "text": " ", "image": None, "audio": None, "label": "dog"},
        {"id": "dots", "text": "...", "image": None, "audio": None, "label": "dog"},
        {"id": "unknown", "text": "a dog", "image": None, "audio": None, "label": "zebra"},
        {"id": "nolabel", "text": "a dog", "image": None, "audio": None, "label": ""},
        {"id": "ok2", "text": "a dog", "image": "images/blue.png", "audio": None, "label": "dog"},
    ]


def test_preprocessor_counts_the_clips_it_crops(tmp_path: Path) -> None:
    pre = collator_prep()  # max_seconds 1.0 at 16 kHz: 101 frames
    write_wav(tmp_path / "long.wav", 2.0)
    write_wav(tmp_path / "exact.wav", 1.0)
    np.save(tmp_path / "spec.npy", np.zeros((40, 150), dtype=np.float32))
    np.save(tmp_path / "short_spec.npy", np.zeros((40, 101), dtype=np.float32))
    widths = [pre.encode("audio", str(tmp_path / name))["mel"].shape[1]  # type: ignore[index]
              for name in ("long.wav", "exact.wav", "spec.npy", "short_spec.npy")]
    assert widths == [101] * 4
    assert pre.crops.count == 2 and pre.crops.longest_seconds == pytest.approx(2.0)
    assert pre.crops.message(pre.audio) == ("2 audio clips were longer than data.audio.max_seconds and were cropped "
                                            "to their first 1 s (the longest was 2 s)")


def test_missing_image_names_manifest_row_id_and_path(media: Path) -> None:
    records = read_manifest(write_manifest(media / "train.jsonl", bad_table(media)), MODALITIES)
    pre, task = fitted(records), ClassificationTask(labels=["cat", "dog"])
    with pytest.raises(DataError) as info:
        build_sample(records[1], pre, task)
    message = str(info.value)
    assert "train.jsonl row 2 (id noimg)" in message
    assert str(media.resolve() / "images/missing.png") in message and "not found" in message
    with pytest.raises(DataError, match=r"train.jsonl row 2 \(id noimg\).*missing.png"):
        MultimodalDataset(records, pre, task)


def test_corrupt_wav_names_manifest_row_id_and_path(media: Path) -> None:
    records = read_manifest(write_manifest(media / "train.jsonl", bad_table(media)), MODALITIES)
    pre = fitted(records)
    with pytest.raises(DataError) as info:
        build_sample(records[2], pre, None)
    message = str(info.value)
    assert "train.jsonl row 3 (id badwav)" in message
    assert "cannot decode audio" in message and str(media.resolve() / "audio/corrupt.wav") in message


def test_sample_with_no_modality_is_an_error(media: Path) -> None:
    records = read_manifest(write_manifest(media / "train.jsonl", bad_table(media)), MODALITIES)
    pre = fitted(records)
    assert records[3].fields == dict.fromkeys(MODALITIES)
    with pytest.raises(DataError, match=r"row 4 \(id empty\): no modality present"):
        build_sample(records[3], pre, None)
    dots, dot = pre.encode("text", "..."), pre.encode("text", ".")
    assert dots is not None and dot is not None  # punctuation marks are tokens: three of them
    assert dots["input_ids"].tolist() == dot["input_ids"].tolist() * 3 and len(dot["input_ids"]) == 1
    # but text with no tokens at all counts as absent, so this sample has no modality either
    emptied = Record(records[3].source, 9, "ws", {"text": "\u00a0", "image": None, "audio": None})
    with pytest.raises(DataError, match=r"row 9 \(id ws\): no modality present"):
        build_sample(emptied, pre, None)


@pytest.mark.parametrize("index, reason", [(5, "label 'zebra' is not one of the 2 training labels"),
                                           (6, "the target is empty")])
def test_bad_classification_target_names_the_row(media: Path, index: int, reason: str) -> None:
    records = read_manifest(write_manifest(media / "train.jsonl", bad_table(media)), MODALITIES)
    pre, task = fitted(records), ClassificationTask(labels=["cat", "dog"])
    record = records[index]
    with pytest.raises(DataError, match=rf"row {index + 1} \(id {record.id}\): {reason}"):
        build_sample(record, pre, task)
    assert build_sample(record, pre, None).target is None  # no task (predict): the target is not read


def test_non_numeric_regression_target_names_the_row(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "r.csv", [{"id": "a", "text": "t", "y": "1.5"},
                                                   {"id": "b", "text": "t", "y": "abc"}])
    records = read_manifest(manifest, {"text": MODALITIES["text"]}, target_column="y")
    pre = Preprocessor({"text": MODALITIES["text"]}, TextPrep(), ImagePrep(), AudioPrep())
    pre.fit(records)
    task = RegressionTask()
    good = build_sample(records[0], pre, task)
    assert good.target is not None and good.target.tolist() == [1.5]
    with pytest.raises(DataError, match=r"r.csv row 2 \(id b\): target 'abc' is not a number"):
        build_sample(records[1], pre, task)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_missing_multilabel_target_names_the_row_or_is_a_counted_skip(tmp_path: Path, suffix: str) -> None:
    explicit_none: Any = [] if suffix == ".jsonl" else "[]"
    rows = [{"id": "a", "text": "t", "tags": ["p", "q"] if suffix == ".jsonl" else "p|q"},
            {"id": "b", "text": "t", "tags": explicit_none},
            {"id": "c", "text": "t", "tags": None},
            {"id": "d", "text": "t", "tags": "q"}]
    manifest = write_manifest(tmp_path / f"m{suffix}", rows)
    mods = {"text": MODALITIES["text"]}
    records = read_manifest(manifest, mods, target_column="tags")
    pre = Preprocessor(mods, TextPrep(), ImagePrep(), AudioPrep())
    pre.fit(records)
    task = MultilabelTask()
    task.fit([r.target for r in records])
    assert task.labels == ["p", "q"]
    with pytest.raises(DataError, match=rf"m{suffix} row 3 \(id c\): the target is empty"):
        MultimodalDataset(records, pre, task)
    skipping = MultimodalDataset(records, pre, task, on_error="skip")
    assert [s.id for s in skipping.samples] == ["a", "b", "d"] and skipping.report.count == 1
    assert [s.target.tolist() for s in skipping.samples] == [[1, 1], [0, 0], [0, 1]]  # type: ignore[union-attr]
    assert "row 3 (id c): the target is empty" in skipping.report.skipped[0]


def test_skip_mode_counts_and_explains_every_skipped_sample(media: Path) -> None:
    records = read_manifest(write_manifest(media / "train.jsonl", bad_table(media)), MODALITIES)
    pre, task = fitted(records), ClassificationTask(labels=["cat", "dog"])
    dataset = MultimodalDataset(records, pre, task, on_error="skip")
    assert [s.id for s in dataset.samples] == ["ok", "dots", "ok2"]
    assert len(dataset) == 3 and dataset[2].id == "ok2"
    assert dataset.report.count == 5 == len(dataset.report.skipped)
    expected = {2: "missing.png", 3: "corrupt.wav", 4: "no modality present", 6: "zebra", 7: "target is empty"}
    for reason, (row, detail) in zip(dataset.report.skipped, expected.items(), strict=True):
        assert f"train.jsonl row {row} (id {records[row - 1].id})" in reason and detail in reason
    assert [int(s.target) for s in dataset.samples] == [0, 1, 1]  # type: ignore[arg-type]
    clean = MultimodalDataset([records[0], records[7]], pre, task, on_error="skip")
    assert clean.report.count == 0 and clean.report.skipped == []


# ------------------------------------------------------------------------------------------ collator


def text_sample(sid: str, ids: list[int] | None, mel_frames: int | None, image: bool, target: Any = None) -> Sample:
    inputs: dict[str, Any] = {
        "text": None if ids is None else {"input_ids": torch.tensor(ids, dtype=torch.long)},
        "image": {"pixels": torch.full((3, 32, 32), 0.25)} if image else None,
        "audio": None if mel_frames is None else {"mel": torch.arange(40 * mel_frames, dtype=torch.float32)
                                                  .reshape(40, mel_frames) + 1},
    }
    return Sample(sid, inputs, target)


def collator_prep(**audio: Any) -> Preprocessor:
    return Preprocessor(MODALITIES, TextPrep(), ImagePrep(), AudioPrep(**audio))


def test_collate_pads_text_masks_absent_and_pads_audio_to_max_frames() -> None:
    samples = [
        text_sample("a", [5, 6, 7], 51, image=True),
        text_sample("b", None, None, image=False),
        text_sample("c", [2, 3, 4, 5, 9], 101, image=True),
    ]
    batch = Collator(collator_prep(), None)(samples)
    assert list(batch.inputs) == ["audio", "image", "text"] == list(batch.present)
    assert batch.ids == ["a", "b", "c"] and batch.size == 3 and batch.target is None

    text = batch.inputs["text"]
    assert text["input_ids"].tolist() == [[5, 6, 7, 0, 0], [0, 0, 0, 0, 0], [2, 3, 4, 5, 9]]
    assert text["input_ids"].dtype == torch.long and text["attention_mask"].dtype == torch.bool
    assert text["attention_mask"].sum(1).tolist() == [3, 0, 5]
    assert text["attention_mask"][0].tolist() == [True, True, True, False, False]

    for modality in MODALITIES:
        assert batch.present[modality].dtype == torch.bool
        assert batch.present[modality].tolist() == [True, False, True]
    pixels = batch.inputs["image"]["pixels"]
    assert pixels.shape == (3, 3, 32, 32)
    assert torch.all(pixels[1] == 0) and torch.all(pixels[0] == 0.25)

    mel, frame_mask = batch.inputs["audio"]["mel"], batch.inputs["audio"]["frame_mask"]
    assert mel.shape == (3, 40, 101) and frame_mask.shape == (3, 101) and frame_mask.dtype == torch.bool
    assert frame_mask.sum(1).tolist() == [51, 0, 101]
    assert torch.equal(mel[0, :, :51], samples[0].inputs["audio"]["mel"])  # type: ignore[index]
    assert torch.all(mel[0, :, 51:] == SILENCE_LOG_MEL) and torch.all(mel[1] == 0)  # padding: silence
    assert torch.equal(mel[2], samples[2].inputs["audio"]["mel"])  # type: ignore[index]


def test_collate_pads_log_mel_with_what_a_silent_clip_gives(tmp_path: Path) -> None:
    """Padding frames once held 0, the log-mel of a loud broadband sound; they must be silence."""
    write_wav(tmp_path / "tone.wav", 0.25)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(SR, dtype=np.float32), SR, subtype="PCM_16")
    for pad_mode in ("fixed", "longest"):
        prep = collator_prep(pad_mode=pad_mode)
        tone = prep.encode("audio", str(tmp_path / "tone.wav"))
        silence = prep.encode("audio", str(silent))
        assert tone is not None and silence is not None
        frames = tone["mel"].shape[1]
        assert frames == 0.25 * SR // 160 + 1 < silence["mel"].shape[1] == prep.audio.max_frames
        samples = [Sample("tone", {"audio": tone, "text": None, "image": None}),
                   Sample("silent", {"audio": silence, "text": None, "image": None}),
                   Sample("none", {"audio": None, "text": None, "image": None})]
        audio = Collator(prep, None)(samples).inputs["audio"]
        mel, mask = audio["mel"], audio["frame_mask"]
        assert mel.shape == (3, 40, prep.audio.max_frames) and mask.sum(1).tolist() == [frames, 101, 0]
        assert torch.equal(mel[0, :, :frames], tone["mel"])
        # Every padding frame is bit-identical to a frame of the real silent clip.
        padding = mel[0, :, frames:]
        assert torch.equal(padding, silence["mel"][:, frames:]), pad_mode
        assert torch.equal(padding, torch.full_like(padding, SILENCE_LOG_MEL))
        assert torch.equal(mel[2], torch.zeros_like(mel[2]))  # an absent row holds zeros (the Batch contract)


def test_in_memory_arrays_pad_log_mel_with_silence_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path pads chunk-collated tensors to the split's longest: log-mel with silence too."""
    from mmfuse.data import memory

    monkeypatch.setattr(memory, "_BUILD_CHUNK", 2)
    samples = [text_sample("a", [1], 30, True), text_sample("b", [1], None, True), text_sample("c", [1], 51, True)]
    prep = collator_prep(pad_mode="longest")
    dataset = MultimodalDataset([], prep, None)
    dataset.samples = samples
    arrays = memory.from_dataset(dataset, Collator(prep, None))
    mel = arrays.inputs["audio"]["mel"]
    assert mel.shape == (3, 40, 51) and arrays.inputs["audio"]["frame_mask"].sum(1).tolist() == [30, 0, 51]
    assert torch.equal(mel[0, :, :30], samples[0].inputs["audio"]["mel"])  # type: ignore[index]
    assert torch.all(mel[0, :, 30:] == SILENCE_LOG_MEL)  # 30 -> 30 in its chunk, then 30 -> 51 across chunks
    assert torch.all(mel[1] == 0) and torch.equal(mel[2], samples[2].inputs["audio"]["mel"])  # type: ignore[index]


def test_collate_audio_longest_pads_to_the_batch() -> None:
    samples = [text_sample("a", [1], 30, True), text_sample("b", [1], 51, True), text_sample("c", [1], None, True)]
    batch = Collator(collator_prep(pad_mode="longest"), None)(samples)
    assert batch.inputs["audio"]["mel"].shape == (3, 40, 51)
    assert batch.inputs["audio"]["frame_mask"].sum(1).tolist() == [30, 51, 0]
    assert batch.present["audio"].tolist() == [True, True, False]
    absent = Collator(collator_prep(pad_mode="longest"), None)([text_sample("x", [1], None, True)])
    assert absent.inputs["audio"]["mel"].shape == (1, 40, 1) and not absent.inputs["audio"]["frame_mask"].any()


def test_collate_targets() -> None:
    cls = ClassificationTask(labels=["cat", "dog", "eel"])
    samples = [text_sample(str(i), [1], None, True, cls.encode_target(t)) for i, t in enumerate(["dog", "eel", "cat"])]
    target = Collator(collator_prep(), cls)(samples).target
    assert target is not None and target.dtype == torch.long and target.tolist() == [1, 2, 0]

    multi = MultilabelTask(labels=["a", "b", "c"])
    samples = [text_sample(str(i), [1], None, True, multi.encode_target(t)) for i, t in enumerate(["a|c", [], "b"])]
    target = Collator(collator_prep(), multi)(samples).target
    assert target is not None and target.dtype == torch.float32 and target.shape == (3, 3)
    assert target.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]

    reg = RegressionTask(num_targets=2)
    samples = [text_sample(str(i), [1], None, True, reg.encode_target(t)) for i, t in enumerate([[1, 2], [3.5, -1]])]
    target = Collator(collator_prep(), reg)(samples).target
    assert target is not None and target.dtype == torch.float32 and target.tolist() == [[1, 2], [3.5, -1]]
    # without a task (predict) targets are not collated even when samples carry them
    assert Collator(collator_prep(), None)(samples).target is None


def test_batch_to_cpu_keeps_everything() -> None:
    cls = ClassificationTask(labels=["x", "y"])
    samples = [text_sample("a", [4, 5], 20, True, cls.encode_target("y")),
               text_sample("b", [6], None, False, cls.encode_target("x"))]
    batch = Collator(collator_prep(), cls)(samples)
    moved = batch.to("cpu")
    assert moved.ids == batch.ids == ["a", "b"]
    assert moved.target is not None and batch.target is not None and torch.equal(moved.target, batch.target)
    assert moved.inputs.keys() == batch.inputs.keys() and moved.present.keys() == batch.present.keys()
    for modality, tensors in batch.inputs.items():
        assert tensors.keys() == moved.inputs[modality].keys()
        for key, value in tensors.items():
            assert moved.inputs[modality][key].device.type == "cpu"
            assert moved.inputs[modality][key].dtype == value.dtype and torch.equal(moved.inputs[modality][key], value)
        assert torch.equal(moved.present[modality], batch.present[modality])


# ----------------------------------------------------------------------------- synthetic end to end


def test_synthetic_missing_pipeline_presence_matches_manifest(synth_missing_manifest: Path) -> None:
    raw = [json.loads(line) for line in synth_missing_manifest.read_text().splitlines()]
    records = read_manifest(synth_missing_manifest, MODALITIES, split_column="split")
    assert len(records) == len(raw) == 120
    assert [r.split for r in records].count("train") == 96
    assert [r.id for r in records] == [row["id"] for row in raw]
    train = [r for r in records if r.split == "train"]
    pre = fitted(train)
    task = ClassificationTask()
    task.fit([r.target for r in train])
    assert task.num_outputs == 8

    dataset = MultimodalDataset(records, pre, task)
    assert len(dataset) == 120 and dataset.report.count == 0
    batch = Collator(pre, task)([dataset[i] for i in range(len(dataset))])
    for modality in MODALITIES:
        expected = [row[modality] is not None for row in raw]
        assert batch.present[modality].tolist() == expected, modality
        assert 0 < sum(expected) < 120  # missing_rate 0.3 drops some of every modality
    present = torch.stack([batch.present[m] for m in MODALITIES])
    assert present.any(dim=0).all()  # no sample lost every modality
    audio, image = batch.present["audio"], batch.present["image"]
    assert batch.inputs["image"]["pixels"].shape == (120, 3, 32, 32)
    assert torch.all(batch.inputs["image"]["pixels"][~image] == 0)
    assert batch.inputs["audio"]["mel"].shape == (120, 40, 101)
    assert torch.equal(batch.inputs["audio"]["frame_mask"].all(dim=1), audio)  # 1 s clips fill every frame
    assert not batch.inputs["audio"]["frame_mask"][~audio].any()
    assert torch.equal(batch.inputs["text"]["attention_mask"].any(dim=1), batch.present["text"])
    assert batch.target is not None
    assert [task.labels[i] for i in batch.target.tolist()] == [row["label"] for row in raw]


def test_synthetic_complete_set_with_two_modalities_loads_in_batches(synth_manifest: Path) -> None:
    mods = {m: MODALITIES[m] for m in ("image", "text")}  # any subset of the columns is a valid setup
    records = read_manifest(synth_manifest, mods, split_column="split")
    assert len(records) == 160 and all(set(r.fields) == {"image", "text"} for r in records)
    pre = Preprocessor(mods, TextPrep(), ImagePrep(), AudioPrep())
    pre.fit(records)
    task = ClassificationTask()
    task.fit([r.target for r in records])
    dataset = MultimodalDataset(records, pre, task)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=Collator(pre, task))
    sizes = []
    for batch in loader:
        sizes.append(batch.size)
        assert list(batch.inputs) == ["image", "text"]
        assert all(bool(p.all()) for p in batch.present.values())
        assert math.isfinite(float(batch.inputs["image"]["pixels"].abs().sum()))
        assert batch.target is not None and batch.target.shape == (batch.size,)
    assert sizes == [64, 64, 32]


def test_a_jsonl_manifest_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """JSONL rows are read one at a time (a 200k-row manifest is never held as raw dicts); a decoding
    error on the way still names the file instead of escaping as a UnicodeDecodeError."""
    (tmp_path / "m.jsonl").write_bytes(b'{"id": "a", "text": "t", "label": "x"}\n{"id": "b", "text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"cannot read manifest .*m\.jsonl"):
        read_manifest(tmp_path / "m.jsonl", {"text": MODALITIES["text"]})
