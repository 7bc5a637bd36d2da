"""A pack travels (issue 32): what decides its tensors is refused when it differs, library versions are
named in a warning (refused on request), and mmfuse's preprocessing version is pinned to the tensors
it makes, so a change to the recipe cannot ship without bumping it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from test_pack import pack_config

from mmfuse.config import validate_config
from mmfuse.core.errors import DataError
from mmfuse.data.dataset import build_sample
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_fingerprint import PREPROCESSING_VERSION
from mmfuse.engine.pack_open import open_pack
from mmfuse.engine.records import fit_preprocessing, load_records

TENSORS_OF_VERSION: dict[int, dict[str, object]] = {1: {
    "exact": "f86445b8be3bd5aed466b023736252d8e8bbe50ea95f3070dc9a375709c97f64",
    "float": [  # per float tensor: sum, mean, std, min, max, position-weighted sum
        [-13965.091139, -11.48445, 4.972755, -13.815313, 1.74961, -8110.074706],
        [-85.952911, -0.049741, 0.509763, -0.976471, 0.945098, 39.294947],
        [-13346.41382, -10.975669, 5.35583, -13.81531, 1.855218, -7986.947546],
        [49.576501, 0.02869, 0.508715, -0.976471, 0.945098, 61.843967],
        [-14213.617785, -11.68883, 5.09356, -13.815329, 1.399698, -7991.865115],
        [40.541209, 0.023461, 0.514878, -0.976471, 0.945098, 59.465754],
    ],
}}
"""PREPROCESSING_VERSION -> what ``build_sample`` makes of the fixed rows below: a SHA-256 of every
tensor's name, dtype and shape and of the integer tensors' bytes, and six statistics per float tensor
(sum, mean, std, min, max, a position-weighted sum), compared to 1e-5: an FFT's last bits differ
from one CPU to another (the bytes did between two x86_64 machines), a changed recipe moves these by
far more. When this test fails, the same records now give other tensors: bump PREPROCESSING_VERSION
(old packs are then refused, not misread) and add the new values here."""


def fixed_rows(folder: Path) -> Path:
    """Three train rows and a val row whose files are made from formulas (no random generator, no data set code)."""
    rows = []
    for n in range(4):
        y, x = np.mgrid[0:40, 0:56]
        pixels = np.stack([(x * 4 + n * 30) % 256, (y * 6) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{n}.png")
        t = np.arange(12000) / 16000
        sf.write(folder / f"clip{n}.wav", (0.3 * np.sin(2 * np.pi * (220 + 110 * n) * t)).astype(np.float32), 16000,
                 subtype="PCM_16")
        rows.append({"id": f"r{n}", "split": "train" if n < 3 else "val", "label": f"c{n % 2}",
                     "text": f"a {'red' if n % 2 else 'blue'} bird sings {n} times",
                     "image": f"img{n}.png", "audio": f"clip{n}.wav"})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tensors_fingerprint(folder: Path) -> dict[str, object]:
    """The exact digest and the float statistics of the tensors made of ``fixed_rows(folder)``."""
    config = validate_config({
        "data": {"manifest": str(fixed_rows(folder)), "target_column": "label", "text": {"max_length": 8},
                 "image": {"size": 24}, "audio": {"n_mels": 16, "n_fft": 400, "hop_length": 160}},
        "encoders": {"text": {"name": "text_gru"}, "image": {"name": "image_cnn"}, "audio": {"name": "audio_cnn"}}})
    splits = load_records(config)
    preprocessor, task = fit_preprocessing(config, splits)
    digest, floats = hashlib.sha256(), []
    for record in splits["train"]:
        sample = build_sample(record, preprocessor, task)
        for modality, tensors in sorted(sample.inputs.items()):
            for name, tensor in sorted((tensors or {}).items()):
                digest.update(f"{modality}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                if tensor.is_floating_point():
                    values = tensor.double().flatten()
                    weights = torch.arange(values.numel(), dtype=torch.float64) / values.numel()
                    floats.append([round(float(v), 6) for v in (values.sum(), values.mean(), values.std(),
                                                                values.min(), values.max(), (values * weights).sum())])
                else:
                    digest.update(tensor.contiguous().numpy().tobytes())
    return {"exact": digest.hexdigest(), "float": floats}


def test_the_preprocessing_version_is_pinned_to_the_tensors_it_makes(tmp_path: Path) -> None:
    wanted, got = TENSORS_OF_VERSION.get(PREPROCESSING_VERSION), tensors_fingerprint(tmp_path)
    message = "the same records give other tensors than this preprocessing version did: bump PREPROCESSING_VERSION"
    assert wanted is not None and got["exact"] == wanted["exact"], message
    assert np.allclose(np.array(got["float"]), np.array(wanted["float"]), rtol=1e-5, atol=1e-5), message


@pytest.fixture
def pack(synth_manifest: Path, tmp_path: Path) -> Path:
    pack_data(pack_config(synth_manifest, tmp_path / "run"), tmp_path / "pack", workers=1, shard_size=80)
    return tmp_path / "pack"


def edit_fingerprint(pack: Path, **changes: object) -> None:
    state = json.loads((pack / "pack.json").read_text())
    for key, value in changes.items():
        if value is None:
            state["fingerprint"].pop(key)
        else:
            state["fingerprint"][key] = value
    (pack / "pack.json").write_text(json.dumps(state))


def test_other_library_versions_are_named_in_a_warning_and_refused_on_request(
        synth_manifest: Path, pack: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = json.loads((pack / "pack.json").read_text())
    code = state["fingerprint"]["code"]
    code["libraries"]["torch"], code["libraries"]["Pillow"] = "1.0.0", "7.0.0"
    edit_fingerprint(pack, code=code)
    config = pack_config(synth_manifest, tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        data = open_pack(config, pack)
    assert len(data.datasets["train"]) == len(open_pack(config, pack).datasets["train"]) > 0
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "Pillow 7.0.0 at packing" in warning and "torch 1.0.0 at packing" in warning
    with pytest.raises(DataError, match=r"other library versions \(Pillow 7\.0\.0 at packing, .*pack_strict_versions"):
        open_pack(pack_config(synth_manifest, tmp_path / "run", pack_strict_versions=True), pack)


def test_another_preprocessing_version_is_refused_and_a_pack_from_before_versions_is_version_1(
        synth_manifest: Path, pack: Path, tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    edit_fingerprint(pack, version=None)  # written before the version was recorded: the recipe of version 1
    assert len(open_pack(config, pack).datasets["val"]) > 0
    edit_fingerprint(pack, version=PREPROCESSING_VERSION + 1)
    with pytest.raises(DataError, match=rf"preprocessing version {PREPROCESSING_VERSION + 1}, this mmfuse reads "
                                        rf"version {PREPROCESSING_VERSION}"):
        open_pack(config, pack)


def test_what_decides_the_tensors_is_still_refused(synth_manifest: Path, pack: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.image: .*'size': 16.*'size': 20"):
        open_pack(pack_config(synth_manifest, tmp_path / "run", image={"size": 20}), pack)
