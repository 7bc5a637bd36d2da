"""The synthetic tri-modal set: reproducible files, balanced labels, and one factor per modality."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import mmfuse.datasets.synth as synth
from mmfuse.config import SynthConfig
from mmfuse.core.errors import DataError
from mmfuse.datasets.synth import LABEL_FACTORS, generate_synthetic, synthetic_dataset

MODALITIES = ("text", "image", "audio")
KEYS = ["id", "split", "text", "image", "audio", "label", "shape", "pitch", "mood", "colour", "caption",
        "tags", "frequency_hz"]
CALM = {"calm", "quiet", "gentle", "peaceful", "soft", "still", "serene", "mellow"}
STORMY = {"stormy", "loud", "fierce", "wild", "harsh", "angry", "violent", "furious"}


def read_rows(manifest: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    manifest = generate_synthetic(tmp_path_factory.mktemp("synth") / "data", n_samples=160, seed=3)
    return manifest, read_rows(manifest)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", n_samples=48, seed=7).parent
    b = generate_synthetic(tmp_path / "b", n_samples=48, seed=7).parent
    c = generate_synthetic(tmp_path / "c", n_samples=48, seed=8).parent
    ha, hb, hc = tree_hashes(a), tree_hashes(b), tree_hashes(c)
    assert len(ha) == 1 + 2 * 48
    assert ha == hb
    assert ha.keys() == hc.keys()
    assert sum(ha[k] != hc[k] for k in ha) == len(ha)  # every file differs, not just the manifest


def test_manifest_schema_counts_and_splits(full: tuple[Path, list[dict[str, Any]]]) -> None:
    manifest, rows = full
    assert manifest.name == "manifest.jsonl"
    assert len(rows) == 160
    assert all(list(r) == KEYS for r in rows)
    assert len({r["id"] for r in rows}) == 160
    assert Counter(r["split"] for r in rows) == {"train": 128, "val": 16, "test": 16}
    for r in rows:
        assert r["image"] == f"images/{r['id']}.png"
        assert r["audio"] == f"audio/{r['id']}.wav"
        assert r["caption"] == f"a {r['colour']} {r['shape']} with a {r['pitch']} tone in a {r['mood']} mood"


def test_labels_are_balanced_and_need_all_three_factors(full: tuple[Path, list[dict[str, Any]]]) -> None:
    _, rows = full
    assert LABEL_FACTORS == ("shape", "pitch", "mood")
    for r in rows:
        assert r["label"] == "-".join(r[f] for f in LABEL_FACTORS)
    counts = Counter(r["label"] for r in rows)
    assert len(counts) == 8
    assert max(counts.values()) - min(counts.values()) <= 1
    for factor in LABEL_FACTORS:
        for value in {r[factor] for r in rows}:
            assert len({r["label"] for r in rows if r[factor] == value}) == 4
    # Nuisance colour carries no label information: every colour appears with both shapes.
    for colour in {r["colour"] for r in rows}:
        assert {r["shape"] for r in rows if r["colour"] == colour} == {"circle", "square"}


def test_uneven_count_keeps_class_counts_within_one(tmp_path: Path) -> None:
    counts = Counter(r["label"] for r in read_rows(generate_synthetic(tmp_path, n_samples=21, seed=0)))
    assert sorted(counts.values()) == [2, 2, 2, 3, 3, 3, 3, 3]


def _shape_stats(pixels: np.ndarray) -> tuple[int, float]:
    """(area, fill ratio of the bounding box) of the bright shape on the dark background."""
    mask = pixels.max(axis=2) > 150
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return int(mask.sum()), float(mask.sum() / box)


def test_images_are_32px_rgb_and_carry_the_shape(full: tuple[Path, list[dict[str, Any]]]) -> None:
    manifest, rows = full
    stats: dict[str, list[tuple[int, float]]] = {"circle": [], "square": []}
    for r in rows:
        with Image.open(manifest.parent / r["image"]) as img:
            assert img.format == "PNG"
            assert img.size == (32, 32)
            assert img.mode == "RGB"
            pixels = np.asarray(img)
        stats[r["shape"]].append(_shape_stats(pixels))
    circle_fill = np.array([f for _, f in stats["circle"]])
    square_fill = np.array([f for _, f in stats["square"]])
    assert circle_fill.mean() < 0.85 < 0.95 < square_fill.mean()
    assert circle_fill.max() < square_fill.min()  # the outline separates them perfectly
    circle_area = np.mean([a for a, _ in stats["circle"]])
    square_area = np.mean([a for a, _ in stats["square"]])
    assert abs(circle_area - square_area) / circle_area < 0.15  # size is not a shortcut


def test_audio_is_1s_16k_mono_and_carries_the_pitch(full: tuple[Path, list[dict[str, Any]]]) -> None:
    manifest, rows = full
    for r in rows:
        wave, rate = sf.read(manifest.parent / r["audio"], dtype="float32", always_2d=True)
        info = sf.info(manifest.parent / r["audio"])
        assert (rate, wave.shape, info.subtype) == (16000, (16000, 1), "PCM_16")
        spectrum = np.abs(np.fft.rfft(wave[:, 0]))
        peak_hz = float(np.fft.rfftfreq(16000, 1 / 16000)[spectrum.argmax()])
        if r["pitch"] == "low":
            assert peak_hz < 500, (r["id"], peak_hz)
        else:
            assert peak_hz > 800, (r["id"], peak_hz)
        assert np.abs(wave).max() < 1.0


def test_text_carries_the_mood_and_nothing_else(full: tuple[Path, list[dict[str, Any]]]) -> None:
    _, rows = full
    for r in rows:
        words = set(r["text"].split())
        assert len(words & CALM) + len(words & STORMY) == 1, r["text"]
        assert words & (CALM if r["mood"] == "calm" else STORMY), r["text"]
    texts = [r["text"] for r in rows]
    assert len(set(texts)) > len(texts) // 2  # varied sentences, not 16 fixed strings


def test_missing_rate_drops_fields_and_files(tmp_path: Path) -> None:
    manifest = generate_synthetic(tmp_path, n_samples=200, seed=1, missing_rate=0.3)
    rows = read_rows(manifest)
    for modality in MODALITIES:
        rate = sum(r[modality] is None for r in rows) / len(rows)
        assert 0.18 < rate < 0.42, (modality, rate)
    assert all(any(r[m] is not None for m in MODALITIES) for r in rows)
    assert all(r[f] for r in rows for f in (*LABEL_FACTORS, "label", "colour", "caption"))
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*") if p.name != "manifest.jsonl"}
    expected = {r[m] for r in rows for m in ("image", "audio") if r[m] is not None}
    assert written == expected


def test_missing_rate_keeps_present_content_unchanged(tmp_path: Path) -> None:
    """Dropping a modality must not reshuffle the others, so robustness runs compare like with like."""
    full_rows = read_rows(generate_synthetic(tmp_path / "full", n_samples=40, seed=2))
    sparse_rows = read_rows(generate_synthetic(tmp_path / "sparse", n_samples=40, seed=2, missing_rate=0.5))
    for a, b in zip(full_rows, sparse_rows, strict=True):
        assert a["label"] == b["label"]
        assert b["text"] in (None, a["text"])
        if b["image"] is not None:
            assert (tmp_path / "full" / a["image"]).read_bytes() == (
                tmp_path / "sparse" / b["image"]
            ).read_bytes()


def test_synthetic_dataset_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = synth.generate_synthetic

    def counting(out_dir: Path, *args: Any, **kwargs: Any) -> Path:
        calls.append(out_dir)
        return real(out_dir, *args, **kwargs)

    monkeypatch.setattr(synth, "generate_synthetic", counting)
    config = SynthConfig(n_samples=24, seed=5, cache_dir=tmp_path / "cache")
    first = synthetic_dataset(config)
    second = synthetic_dataset(config)
    assert first == second
    assert len(calls) == 1
    assert first.parent.parent == tmp_path / "cache"
    assert first.parent.name == "v3-n24-s5-m0.0"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["v3-n24-s5-m0.0"]  # no temp left over
    assert len(read_rows(first)) == 24

    other = synthetic_dataset(
        SynthConfig(n_samples=24, seed=5, missing_rate=0.25, cache_dir=tmp_path / "cache")
    )
    assert other.parent.name == "v3-n24-s5-m0.25"
    assert len(calls) == 2


def test_synthetic_dataset_uses_env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "env"))
    manifest = synthetic_dataset(SynthConfig(n_samples=20, seed=0))
    assert manifest == tmp_path / "env" / "synth" / "v3-n20-s0-m0.0" / "manifest.jsonl"
    assert manifest.is_file()


def test_interrupted_generation_leaves_nothing_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(out_dir: Path, *args: Any, **kwargs: Any) -> Path:
        (out_dir / "images").mkdir()
        raise KeyboardInterrupt

    config = SynthConfig(n_samples=20, cache_dir=tmp_path)
    monkeypatch.setattr(synth, "generate_synthetic", crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic_dataset(config)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert synthetic_dataset(config).is_file()


def test_concurrent_creator_wins_the_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process renamed its copy into place first, ours is discarded and theirs is used."""
    config = SynthConfig(n_samples=20, cache_dir=tmp_path)
    final = tmp_path / "v3-n20-s0-m0.0"
    real = synth.generate_synthetic

    def racing(out_dir: Path, *args: Any, **kwargs: Any) -> Path:
        real(final, *args, **kwargs)  # the other process finishes while we are still generating
        return real(out_dir, *args, **kwargs)

    monkeypatch.setattr(synth, "generate_synthetic", racing)
    assert synthetic_dataset(config) == final / "manifest.jsonl"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_samples": 7}, "n_samples"),
        ({"n_samples": 0}, "n_samples"),
        ({"missing_rate": 1.0}, "missing_rate"),
        ({"missing_rate": -0.1}, "missing_rate"),
        ({"missing_rate": float("nan")}, "missing_rate"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise_data_error(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(DataError, match=match):
        generate_synthetic(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(DataError, match="empty folder"):
        generate_synthetic(tmp_path, n_samples=8)
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_extra_targets_match_the_factors_and_the_audio(tmp_path: Path) -> None:
    """tags (multi-label) and frequency_hz (regression) must describe the sample they sit on."""
    rows = read_rows(generate_synthetic(tmp_path / "d", n_samples=40, seed=3))
    for row in rows:
        assert row["tags"].split("|") == [row["shape"], row["pitch"], row["mood"]]
        low = row["pitch"] == "low"
        assert (220 <= row["frequency_hz"] <= 440) if low else (880 <= row["frequency_hz"] <= 1760)
