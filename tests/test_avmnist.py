"""AV-MNIST and avmnist-arith builders, array-backed image/audio fields, and the fast in-memory path.

Builder tests need the real MNIST/FSDD files in ../shared/data (or $MMFUSE_SHARED_DATA) and skip
cleanly without them; they use ``limit`` so a build takes seconds. The full 70,000-sample build is
marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfuse.config import load_config
from mmfuse.core.errors import DataError
from mmfuse.data.dataset import Collator
from mmfuse.data.memory import ArrayDataset, ArrayLoader, cached_arrays, from_dataset
from mmfuse.datasets.avmnist import (
    CANVAS,
    N_FFT,
    AVMnistRecipe,
    _PCAEnergyRemoval,
    build_avmnist,
    spectrogram,
    verify_sums,
)
from mmfuse.datasets.avmnist_arith import ARITH_OPERATIONS, ArithRecipe, arith_label, build_avmnist_arith
from mmfuse.datasets.mnist_fsdd import SAMPLE_RATE, read_idx, read_mnist

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MMFUSE_SHARED_DATA", REPO.parent / "shared" / "data"))
MNIST, FSDD = SHARED / "mnist", SHARED / "fsdd"
needs_data = pytest.mark.skipif(not (MNIST.is_dir() and FSDD.is_dir()),
                                reason=f"MNIST/FSDD not found under {SHARED} (set MMFUSE_SHARED_DATA)")
LIMIT = 240  # 240 train (20 of them val) + 40 test


@pytest.fixture(scope="module")
def avmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (MNIST.is_dir() and FSDD.is_dir()):
        pytest.skip(f"MNIST/FSDD not found under {SHARED}")
    return build_avmnist(MNIST, FSDD, tmp_path_factory.mktemp("avmnist") / "a", AVMnistRecipe(limit=LIMIT)).parent


@pytest.fixture(scope="module")
def arith(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (MNIST.is_dir() and FSDD.is_dir()):
        pytest.skip(f"MNIST/FSDD not found under {SHARED}")
    return build_avmnist_arith(MNIST, FSDD, tmp_path_factory.mktemp("arith") / "a", ArithRecipe(limit=LIMIT)).parent


def sums(folder: Path) -> str:
    return (folder / "SHA256SUMS").read_text()


# ---- builder -------------------------------------------------------------------------------------

@needs_data
def test_same_seed_gives_identical_hashes_and_another_seed_differs(avmnist: Path, tmp_path: Path) -> None:
    again = build_avmnist(MNIST, FSDD, tmp_path / "again", AVMnistRecipe(limit=LIMIT)).parent
    assert sums(again) == sums(avmnist)
    verify_sums(again)
    other = build_avmnist(MNIST, FSDD, tmp_path / "other", AVMnistRecipe(limit=LIMIT, seed=1)).parent
    lines = dict(line.split("  ")[::-1] for line in sums(other).splitlines())
    first = dict(line.split("  ")[::-1] for line in sums(avmnist).splitlines())
    assert lines["audio/train_data.npy"] != first["audio/train_data.npy"]
    assert lines["image/train_data.npy"] == first["image/train_data.npy"]  # PCA removal is not random
    assert set(lines) == {"image/train_data.npy", "image/test_data.npy", "audio/train_data.npy",
                          "audio/test_data.npy", "train_labels.npy", "test_labels.npy", "manifest.jsonl",
                          "recipe.json"}


@needs_data
def test_verify_sums_names_a_modified_file(avmnist: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(avmnist, tmp_path / "copy"))
    labels = np.load(copy / "test_labels.npy")
    labels[0] = (labels[0] + 1) % 10
    np.save(copy / "test_labels.npy", labels)
    with pytest.raises(DataError, match=r"test_labels\.npy"):
        verify_sums(copy)


@needs_data
def test_multibench_layout_loads_with_numpy_in_the_documented_shapes(avmnist: Path) -> None:
    mnist_train, mnist_labels = read_mnist(MNIST, "train")
    image = np.load(avmnist / "image" / "train_data.npy")
    audio = np.load(avmnist / "audio" / "train_data.npy")
    labels = np.load(avmnist / "train_labels.npy")
    assert image.shape == (LIMIT, 784) and image.dtype == np.float32
    assert audio.shape == (LIMIT, 112, 112) and audio.dtype == np.float32
    assert labels.shape == (LIMIT,) and labels.dtype == np.int64
    assert np.array_equal(labels, mnist_labels[:LIMIT])  # pairs follow MNIST's order and label
    assert np.array_equal(image, np.rint(image)) and image.min() >= 0 and image.max() <= 255
    assert audio.min() >= 0 and audio.max() <= 255 and audio.std() > 10
    assert np.load(avmnist / "image" / "test_data.npy").shape == (40, 784)
    assert np.load(avmnist / "audio" / "test_data.npy").shape == (40, 112, 112)
    # What MultiBench's get_dataloader does with it: /255, reshape to 28x28, unsqueeze a channel.
    as_multibench = np.expand_dims((image / 255.0).reshape(LIMIT, 28, 28), 1)
    assert as_multibench.shape == (LIMIT, 1, 28, 28)
    # The images are not the raw MNIST digits: only their leading principal components are left,
    # so the set spans a k-dimensional affine subspace (k < 10) instead of MNIST's ~200 dimensions.
    raw = mnist_train[:LIMIT].reshape(LIMIT, -1).astype(np.float64)
    assert abs(np.corrcoef(raw.ravel(), image.ravel())[0, 1]) < 0.9
    kept = json.loads((avmnist / "recipe.json").read_text())["pca_components_kept"]
    singular = np.linalg.svd(image - image.mean(axis=0), compute_uv=False)
    assert 1 <= kept < 10
    assert singular[kept] < 0.05 * singular[kept - 1], "beyond k components only rounding noise is left"


@needs_data
def test_manifest_pairs_digits_and_marks_the_last_twelfth_of_train_as_val(avmnist: Path) -> None:
    rows = [json.loads(line) for line in (avmnist / "manifest.jsonl").read_text().splitlines()]
    splits = [r["split"] for r in rows]
    assert splits.count("train") == 220 and splits.count("val") == 20 and splits.count("test") == 40
    assert all(r["split"] == "val" for r in rows[220:240])
    for row in rows:
        digit, _speaker, take = row["fsdd_clip"].split("_")
        assert int(digit) == row["label"], "the spoken digit matches the image's label"
        assert (int(take) < 5) == (row["split"] == "test"), "FSDD takes 0-4 pair with MNIST test only"
    recipe = json.loads((avmnist / "recipe.json").read_text())
    assert recipe["pca_components_kept"] >= 1 and recipe["recipe"]["pca_removed"] == 0.75


@needs_data
def test_pca_energy_removal_on_all_of_mnist_keeps_the_calibrated_components() -> None:
    """The calibrated recipe (benchmarks/RESULTS.md): 75% removed keeps 4 components, 70% keeps 5."""
    images, _ = read_mnist(MNIST, "train")
    pca = _PCAEnergyRemoval.fit(images, 0.75)
    assert pca.kept == 4 and _PCAEnergyRemoval.fit(images, 0.70).kept == 5
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(4), atol=1e-9)
    # By hand: the mean image plus the projection on the kept components, one affine map to 0..255.
    x = images[:6].reshape(6, -1).astype(np.float64)
    rebuilt = pca.mean + (x - pca.mean) @ pca.components.T @ pca.components
    expected = np.rint(np.clip((rebuilt - pca.low) / (pca.high - pca.low) * 255.0, 0.0, 255.0))
    assert np.array_equal(pca.apply(images[:6]), expected.astype(np.float32))
    # What is kept is a quarter of the variance, no more than one component's worth above it.
    centred = images.reshape(len(images), -1).astype(np.float64) - pca.mean
    kept = ((centred[:5000] @ pca.components.T) ** 2).sum() / (centred[:5000] ** 2).sum()
    assert 0.25 <= kept < 0.32


@needs_data
def test_without_pca_removal_the_images_are_the_mnist_pixels(tmp_path: Path) -> None:
    out = build_avmnist(MNIST, FSDD, tmp_path / "raw", AVMnistRecipe(limit=24, pca_removed=0.0)).parent
    images, _ = read_mnist(MNIST, "test")
    assert np.array_equal(np.load(out / "image" / "test_data.npy"), images[:4].reshape(4, -1).astype(np.float32))


@pytest.mark.slow
@needs_data
def test_builder_accepts_uncompressed_idx_in_torchvision_layout_and_an_fsdd_zip(tmp_path: Path) -> None:
    import gzip
    import zipfile

    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in MNIST.glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    archive = tmp_path / "fsdd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for wav in sorted((FSDD / "recordings").glob("*.wav")):
            zf.write(wav, f"free-spoken-digit-dataset-master/recordings/{wav.name}")
    a = build_avmnist(tmp_path / "tv", archive, tmp_path / "a", AVMnistRecipe(limit=24)).parent
    b = build_avmnist(MNIST, FSDD, tmp_path / "b", AVMnistRecipe(limit=24)).parent
    assert sums(a) == sums(b)


def test_bad_inputs_give_errors_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 12)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        read_idx(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train images file"):
        read_mnist(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="pca_removed"):
        build_avmnist(tmp_path, tmp_path, tmp_path / "out", AVMnistRecipe(pca_removed=1.5))


@needs_data
def test_existing_output_is_not_overwritten_without_the_flag(avmnist: Path) -> None:
    with pytest.raises(DataError, match="overwrite"):
        build_avmnist(MNIST, FSDD, avmnist, AVMnistRecipe(limit=LIMIT))


def test_spectrogram_puts_a_tone_in_its_frequency_row() -> None:
    t = np.arange(CANVAS) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    spec = spectrogram(tone[None])
    assert spec.shape == (1, 112, 112)
    expected_row = round(1000.0 / (SAMPLE_RATE / N_FFT))
    assert set(spec[0].argmax(axis=0).tolist()) == {expected_row}  # every frame peaks at 1 kHz
    assert np.allclose(spec[0, expected_row], spec[0, expected_row, 0], atol=1e-3)  # steady in time
    assert spectrogram(np.zeros((1, CANVAS), np.float32)).max() == 0.0  # silence is the floor


# ---- avmnist-arith --------------------------------------------------------------------------------

def test_arith_label_is_the_operation_mod_10() -> None:
    assert arith_label(7, "plus", 5) == 2
    assert arith_label(3, "minus", 8) == 5
    assert arith_label(4, "times", 9) == 6
    with pytest.raises(DataError, match="divide"):
        arith_label(1, "divide", 1)


@needs_data
def test_arith_build_labels_operands_and_text(arith: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (arith / "manifest.jsonl").read_text().splitlines()]
    _, mnist_labels = read_mnist(MNIST, "train")
    for i, row in enumerate(r for r in rows if r["split"] in ("train", "val")):
        assert row["a"] == mnist_labels[i]
        assert row["label"] == arith_label(row["a"], row["op"], row["b"])
        assert any(phrase in row["text"] for phrase in ARITH_OPERATIONS[row["op"]])
        assert int(row["fsdd_clip"].split("_")[0]) == row["b"]
    operands = np.load(arith / "train_operands.npy")
    ops = list(ARITH_OPERATIONS)
    labels = np.load(arith / "train_labels.npy")
    assert np.array_equal(labels, [arith_label(int(a), ops[o], int(b)) for a, o, b in operands])
    assert len({r["op"] for r in rows}) == 3 and len({r["label"] for r in rows}) == 10
    again = build_avmnist_arith(MNIST, FSDD, tmp_path / "again", ArithRecipe(limit=LIMIT)).parent
    assert sums(again) == sums(arith)


# ---- array-backed fields and the fast path --------------------------------------------------------

def _config(folder: Path, name: str = "avmnist-late.yaml", **changes: object) -> object:
    overrides = [f"data.manifest={folder / 'manifest.jsonl'}", "trainer.progress_bar=false",
                 "data.batch_size=32", "encoders.image.norm=group", "encoders.audio.norm=group"]
    overrides += [f"{k}={v}" for k, v in changes.items()]
    return load_config(REPO / "configs" / name, overrides)


@needs_data
def test_array_fields_feed_the_image_and_audio_kinds(avmnist: Path) -> None:
    from mmfuse.engine.data import load_records, prepare_data

    config = _config(avmnist, **{"data.in_memory": "false"})
    data = prepare_data(config)  # type: ignore[arg-type]
    sample = data.datasets["test"][3]
    image = np.load(avmnist / "image" / "test_data.npy")[3].reshape(1, 28, 28) / 255.0
    assert torch.allclose(sample.inputs["image"]["pixels"], torch.from_numpy(image).float())  # type: ignore[index]
    audio = np.load(avmnist / "audio" / "test_data.npy")[3]
    assert torch.equal(sample.inputs["audio"]["mel"], torch.from_numpy(audio))  # type: ignore[index]
    records = load_records(config)  # type: ignore[arg-type]
    assert records["test"][3].fields["audio"].endswith("audio/test_data.npy#3")


@needs_data
def test_fast_path_batches_equal_collated_batches_and_are_cached(avmnist: Path, tmp_path: Path) -> None:
    from mmfuse.engine.data import load_records, prepare_data

    config = _config(avmnist, **{"data.in_memory": "false"})
    data = prepare_data(config)  # type: ignore[arg-type]
    dataset = data.datasets["val"]
    collator = Collator(data.preprocessor, data.task)
    arrays = cached_arrays(load_records(config)["val"], data.preprocessor, data.task, "raise",  # type: ignore[arg-type]
                           tmp_path / "cache")
    assert isinstance(arrays, ArrayDataset) and len(arrays) == len(dataset) == 20
    torch.manual_seed(3)
    slow = list(torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collator))
    torch.manual_seed(3)
    fast = list(ArrayLoader(arrays, batch_size=8, shuffle=True))
    assert [b.ids for b in fast] == [b.ids for b in slow] and len(fast) == 3
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a.target, b.target)  # type: ignore[arg-type]
        for m in a.inputs:
            assert torch.equal(a.present[m], b.present[m])
            for key in a.inputs[m]:
                assert torch.equal(a.inputs[m][key], b.inputs[m][key]), (m, key)
    # Second call: served from the memory-mapped cache, same values.
    cached = cached_arrays(load_records(config)["val"], data.preprocessor, data.task, "raise",  # type: ignore[arg-type]
                           tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1, "the second call reuses the cached arrays"
    assert torch.equal(cached.inputs["audio"]["mel"], arrays.inputs["audio"]["mel"])
    # A sample read back from the tensors equals the per-sample one.
    assert torch.equal(cached[5].inputs["image"]["pixels"], dataset[5].inputs["image"]["pixels"])  # type: ignore[index]


def test_from_dataset_pads_variable_length_text_and_trims_it_back(synth_manifest: Path) -> None:
    from mmfuse.engine.data import prepare_data

    config = load_config(REPO / "configs" / "synthetic.yaml",
                         [f"data.manifest={synth_manifest}", "data.synthetic=null"])
    data = prepare_data(config)
    dataset = data.datasets["val"]
    arrays = from_dataset(dataset, Collator(data.preprocessor, data.task))
    lengths = {len(s.inputs["text"]["input_ids"]) for s in dataset.samples}  # type: ignore[index]
    assert len(lengths) > 1, "the synthetic text has varying lengths"
    assert arrays.inputs["text"]["input_ids"].shape[1] == max(lengths)
    for i in range(len(dataset)):
        assert torch.equal(arrays[i].inputs["text"]["input_ids"], dataset[i].inputs["text"]["input_ids"])  # type: ignore[index]
        assert torch.equal(arrays[i].inputs["audio"]["mel"], dataset[i].inputs["audio"]["mel"])  # type: ignore[index]


@needs_data
def test_training_on_the_fast_path_matches_the_regular_path(avmnist: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfuse.engine.fit import train

    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    results = {}
    for fast in (True, False):
        config = _config(avmnist, **{"data.in_memory": str(fast).lower(), "trainer.max_epochs": 1,
                                     "trainer.output_dir": str(tmp_path / f"run-{fast}")})
        results[fast] = train(config)  # type: ignore[arg-type]
    assert isinstance(results[True].model, torch.nn.Module)
    assert results[True].test_metrics == pytest.approx(results[False].test_metrics, abs=1e-5)
    assert results[True].val_metrics == pytest.approx(results[False].val_metrics, abs=1e-5)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("name", ["avmnist-tfn.yaml", "avmnist-lmf.yaml", "avmnist-attention.yaml",
                                  "avmnist-gated.yaml"])
def test_avmnist_configs_train_one_epoch(avmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         name: str) -> None:
    from mmfuse.engine.fit import train

    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    config = _config(avmnist, name, **{"trainer.max_epochs": 1, "trainer.output_dir": str(tmp_path / "run")})
    result = train(config)  # type: ignore[arg-type]
    assert result.test_metrics is not None and 0.0 <= result.test_metrics["accuracy"] <= 1.0


@pytest.mark.slow
@needs_data
def test_arith_config_trains_on_three_modalities(arith: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three modalities through the fast path; the text column is tokenised like any text."""
    from mmfuse.engine.fit import train

    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    config = _config(arith, "avmnist-arith.yaml", **{"trainer.max_epochs": 1,
                                                     "trainer.output_dir": str(tmp_path / "run")})
    result = train(config)  # type: ignore[arg-type]
    assert result.test_metrics is not None and set(result.model.encoders) == {"audio", "image", "text"}


@pytest.mark.slow
@needs_data
def test_full_build_twice_gives_identical_hashes(tmp_path: Path) -> None:
    a = build_avmnist(MNIST, FSDD, tmp_path / "a").parent
    b = build_avmnist(MNIST, FSDD, tmp_path / "b").parent
    assert sums(a) == sums(b)
    assert np.load(a / "audio" / "train_data.npy", mmap_mode="r").shape == (60000, 112, 112)
    assert np.load(a / "image" / "test_data.npy", mmap_mode="r").shape == (10000, 784)
    counts = json.loads((a / "recipe.json").read_text())["counts"]
    assert counts == {"train": 55000, "val": 5000, "test": 10000}
