"""Packs (``mmfuse data pack``, ``data.pack``): shards equal to the in-memory tensors, resumable packing,
fingerprints, skipped and damaged samples, and streaming sharded by rank and worker."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmfuse.config import ExperimentConfig, validate_config
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.dataset import Collator
from mmfuse.data.pack_dataset import PackDataset
from mmfuse.engine import data as data_module
from mmfuse.engine import loader as loader_module
from mmfuse.engine import pack as pack_module
from mmfuse.engine import pack_check, pack_fingerprint
from mmfuse.engine.data import prepare_data
from mmfuse.engine.evaluate import evaluate
from mmfuse.engine.fit import fit
from mmfuse.engine.loader import ResumableLoader
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack
from mmfuse.model import MultimodalModel


def pack_config(manifest: Path, out: Path, **data: object) -> ExperimentConfig:
    raw: dict = {
        "seed": 0,
        "data": {"manifest": str(manifest), "target_column": "pitch", "batch_size": 16,
                 "text": {"max_length": 12}, "image": {"size": 16},
                 "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}, **data},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "image": {"name": "image_cnn", "dim": 16, "channels": [8]},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [8, 16]}},
        "fusion": {"name": "concat", "out_dim": 16, "proj_dim": 16, "hidden": 16},
        "optim": {"lr": 0.005},
        "trainer": {"max_epochs": 3, "patience": None, "output_dir": str(out), "progress_bar": False, "threads": 1},
    }
    return validate_config(raw)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".tar" or (p.name.endswith(".json")
            and p.name != "pack.json")}


@pytest.fixture
def own_data(synth_manifest: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic set that a test may edit."""
    shutil.copytree(synth_manifest.parent, tmp_path / "data")
    return tmp_path / "data" / synth_manifest.name


def test_pack_trains_and_evaluates_as_the_per_sample_path(synth_manifest: Path, tmp_path: Path) -> None:
    plain = pack_config(synth_manifest, tmp_path / "plain")
    result = pack_data(plain, tmp_path / "pack", workers=2, shard_size=40)
    assert result.counts == {"train": 128, "val": 16, "test": 16} and result.shards_written == 6
    packed = plain.model_copy(update={"data": plain.data.model_copy(update={"pack": str(tmp_path / "pack")}),
                                      "trainer": plain.trainer.model_copy(update={"output_dir": tmp_path / "packed"})})
    data = prepare_data(packed)
    assert all(isinstance(d, PackDataset) for d in data.datasets.values())
    # The packed samples are the tensors the per-sample path makes, in the same order.
    reference = prepare_data(plain)
    for split in ("train", "test"):
        ours, theirs = data.datasets[split], reference.datasets[split]
        assert len(ours) == len(theirs)
        for i in (0, 7, len(ours) - 1):
            a, b = ours[i], theirs[i]
            assert a.id == b.id and torch.equal(a.target, b.target)  # type: ignore[arg-type]
            for m, inputs in b.inputs.items():
                assert inputs is not None and a.inputs[m] is not None
                for name, tensor in inputs.items():
                    assert torch.equal(a.inputs[m][name], tensor), (split, i, m, name)  # type: ignore[index]
    # Same seed, same batches (ResumableLoader orders both by seed + epoch): the same model and metrics.
    from_pack, in_memory = fit(packed, data), fit(plain, reference)
    assert from_pack.val_metrics == in_memory.val_metrics
    assert from_pack.test_metrics == in_memory.test_metrics
    for (name, p), q in zip(from_pack.model.state_dict().items(), in_memory.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # The saved model carries the pack's fitted preprocessing: it reads raw files again.
    reloaded = MultimodalModel.from_pretrained(tmp_path / "packed" / "model")
    assert evaluate(reloaded, reference.datasets["test"]) == pytest.approx(in_memory.test_metrics)


def test_shards_are_webdataset_tars_of_npy_and_json_only(synth_manifest: Path, tmp_path: Path) -> None:
    """Members are .npy (compact ones zstd-compressed: .npy.zst, what `zstd -d` reads) and JSON."""
    import webdataset as wds
    import zstandard

    pack_data(pack_config(synth_manifest, tmp_path / "run"), tmp_path / "pack", workers=1, shard_size=64)
    shard = tmp_path / "pack" / "train-00000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        assert members and all(m.isfile() for m in members)
        for member in members:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            assert member.name.endswith((".npy", ".npy.zst", ".json")), member.name
            if member.name.endswith(".zst"):
                data = zstandard.ZstdDecompressor().decompress(data)
            if member.name.endswith((".npy", ".npy.zst")):
                array = np.load(io.BytesIO(data), allow_pickle=False)  # raises on any pickled object
                assert array.dtype != object
            else:
                json.loads(data)
    # WebDataset itself reads the shard: one record per sample, keyed as packed.
    records = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert len(records) == 64 and json.loads(records[0]["json"])["id"] == "s00000"


def test_a_killed_pack_resumes_to_the_same_bytes(synth_manifest: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    pack_data(config, tmp_path / "whole", workers=1, shard_size=40)
    real, calls = pack_module.write_shard, []

    def dies_on_the_third_shard(path: Path, *args: object) -> object:
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while writing
        return real(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pack_module, "write_shard", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pack_data(config, tmp_path / "resumed", workers=1, shard_size=40)
    monkeypatch.setattr(pack_module, "write_shard", real)
    first = tmp_path / "resumed" / "test-00000.tar"
    stamp = first.stat().st_ino, first.stat().st_mtime_ns
    assert not (tmp_path / "resumed" / "pack.json").exists()
    assert not list((tmp_path / "resumed").glob(".*tmp-*"))  # nothing half-written left behind
    with pytest.raises(DataError, match=r"not a finished pack.*run `mmfuse data pack` again"):
        open_pack(config, tmp_path / "resumed")
    result = pack_data(config, tmp_path / "resumed", workers=2, shard_size=40)
    assert (result.shards_kept, result.shards_written) == (2, 4)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # kept, not rewritten
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "whole")
    # A finished pack is never rewritten unless --rebuild.
    again = pack_data(config, tmp_path / "resumed", workers=1, shard_size=40)
    assert again.already_packed and (first.stat().st_ino, first.stat().st_mtime_ns) == stamp
    rebuilt = pack_data(config, tmp_path / "resumed", workers=1, shard_size=40, rebuild=True)
    assert rebuilt.shards_written == 6 and files_of(tmp_path / "resumed") == files_of(tmp_path / "whole")


def test_changed_file_or_option_invalidates_the_pack(own_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = pack_config(own_data, tmp_path / "run")
    pack_data(config, tmp_path / "pack", workers=1, shard_size=80)
    hashed: list[object] = []
    real_digest = pack_fingerprint.file_digest
    for module in (pack_fingerprint, pack_check):
        monkeypatch.setattr(module, "file_digest", lambda path: hashed.append(path) or real_digest(path))
    open_pack(config, tmp_path / "pack")  # matches, and no unchanged file is read again to say so
    assert hashed == []
    with pytest.raises(DataError, match=r"data\.audio: .*n_mels.* --rebuild"):
        open_pack(pack_config(own_data, tmp_path / "run", audio={"n_mels": 16, "n_fft": 512, "hop_length": 256}),
                  tmp_path / "pack")
    wav = sorted((own_data.parent / "audio").glob("*.wav"))[5]
    data = bytearray(wav.read_bytes())
    data[-1] ^= 1  # one sample's last byte: same size, other content, and the old mtime restored
    before = wav.stat()
    wav.write_bytes(bytes(data))
    os.utime(wav, ns=(before.st_atime_ns, before.st_mtime_ns))
    open_pack(config, tmp_path / "pack")  # a pack is self-contained: training does not read the raw files
    assert hashed == []
    checked = config.model_copy(update={"data": config.data.model_copy(update={"check_sources": True})})
    with pytest.raises(DataError, match=rf"input files changed since packing: .*{wav.name}"):
        open_pack(checked, tmp_path / "pack")
    with pytest.raises(DataError, match=r"other data or preprocessing.*--rebuild"):
        pack_data(config, tmp_path / "pack", workers=1, shard_size=80)
    assert pack_data(config, tmp_path / "pack", workers=1, shard_size=80, rebuild=True).shards_written == 4
    open_pack(config, tmp_path / "pack")


def test_a_corrupt_image_is_skipped_and_counted_or_stops_the_pack(own_data: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in own_data.read_text().splitlines()]
    bad = next(r for r in rows if r["split"] == "train")
    (own_data.parent / bad["image"]).write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"row \d+.*{bad['id']}|{bad['id']}.*cannot decode image"):
        pack_data(pack_config(own_data, tmp_path / "run"), tmp_path / "raise", workers=2, shard_size=40)
    config = pack_config(own_data, tmp_path / "run", on_error="skip")
    result = pack_data(config, tmp_path / "skip", workers=2, shard_size=40)
    assert result.counts["train"] == 127
    assert result.skipped == {"train": {next(iter(result.skipped["train"])): 1}}
    assert "cannot decode image" in next(iter(result.skipped["train"]))
    report = json.loads((tmp_path / "skip" / "pack.json").read_text())["skipped"]
    assert report == result.skipped
    data = open_pack(config, tmp_path / "skip")
    assert data.skipped["train"].rows[0]["id"] == bad["id"]


def test_a_truncated_shard_is_named(synth_manifest: Path, tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    pack_data(config, tmp_path / "pack", workers=1, shard_size=40)
    shard = tmp_path / "pack" / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"train-00001\.tar is truncated or damaged: 5000 bytes"):
        open_pack(config, tmp_path / "pack")


def test_two_ranks_times_two_workers_split_the_pack_evenly(synth_manifest: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    pack_data(config, tmp_path / "pack", workers=1, shard_size=40)
    data = open_pack(config, tmp_path / "pack")
    train = data.datasets["train"]
    seen: list[list[str]] = []
    batches: list[int] = []
    for rank in (0, 1):
        monkeypatch.setattr(loader_module, "_rank_and_world", lambda rank=rank: (rank, 2))
        loader = ResumableLoader(train, Collator(data.preprocessor, data.task), 10, True, 2, seed=3)
        try:
            ids = [batch.ids for batch in loader]
        finally:
            loader.close()
        batches.append(len(ids))
        seen.append([i for b in ids for i in b])
    assert batches[0] == batches[1] == len(loader) == 7  # ceil(ceil(128 / 2) / 10)
    assert set(seen[0]).isdisjoint(seen[1])  # 128 samples split evenly: no padding needed
    assert sorted(seen[0] + seen[1]) == sorted(train[i].id for i in range(len(train)))


def test_cli_pack_and_train_from_it(synth_manifest: Path, tmp_path: Path) -> None:
    from mmfuse.cli import app

    config = pack_config(synth_manifest, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json", exclude={"trainer": {"overwrite"}})))
    runner = CliRunner()
    first = runner.invoke(app, ["data", "pack", "-c", str(path), "--out", str(tmp_path / "pack"), "--workers", "2",
                                "--shard-size", "50"])
    assert first.exit_code == 0, first.output
    assert "packed test 16, train 128, val 16 samples" in " ".join(first.output.split())
    second = runner.invoke(app, ["data", "pack", "-c", str(path), "--out", str(tmp_path / "pack")])
    assert second.exit_code == 0 and "already a pack of this data" in " ".join(second.output.split())
    trained = runner.invoke(app, ["train", str(path), "--pack", str(tmp_path / "pack"),
                                  "--set", "trainer.max_epochs=1"])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_a_reader_keeps_few_shards_open(synth_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfuse.data import pack_dataset

    config = pack_config(synth_manifest, tmp_path / "run")
    pack_data(config, tmp_path / "pack", workers=1, shard_size=20)
    train = open_pack(config, tmp_path / "pack").datasets["train"]
    assert isinstance(train, PackDataset) and len(train.paths) == 7
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    expected = [train[i].id for i in order]
    monkeypatch.setattr(pack_dataset, "OPEN_SHARDS", 2)
    fresh = open_pack(config, tmp_path / "pack").datasets["train"]
    assert [fresh[i].id for i in order] == expected
    assert len(fresh._fds) == 2  # type: ignore[attr-defined]


def test_a_pack_killed_with_sigkill_resumes_to_the_same_bytes(synth_manifest: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    config = pack_config(synth_manifest, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json", exclude={"trainer": {"overwrite"}})))
    pack_data(config, tmp_path / "whole", workers=1, shard_size=20)
    # The real command, slowed down after each shard so that it is surely killed half-way.
    script = ("import sys, time\nfrom mmfuse.engine import pack\nreal = pack.write_shard\n"
              "def slow(*a):\n    out = real(*a)\n    time.sleep(0.5)\n    return out\n"
              "pack.write_shard = slow\nfrom mmfuse.cli import main\nsys.argv = sys.argv[1:]\nmain()\n")
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", script, "mmfuse", "data", "pack", "-c", str(path),
                                "--out", str(out), "--workers", "1", "--shard-size", "20"],
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 120
        while not (out / "test-00000.tar.index.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "pack.json").exists() and (out / "test-00000.tar").exists()
    result = pack_data(config, out, workers=2, shard_size=20)
    assert result.shards_kept >= 1 and result.shards_kept + result.shards_written == 9  # 1 test + 7 train + 1 val
    assert files_of(out) == files_of(tmp_path / "whole")
    assert not list(out.glob(".*tmp-*"))  # the killed writer's temporaries were cleared


def test_pack_and_in_memory_are_exclusive(synth_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.pack streams .* give one of them"):
        pack_config(synth_manifest, tmp_path / "run", pack=str(tmp_path / "pack"), in_memory=True)


def test_bench_reads_the_pack(synth_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfuse.cli import app

    config = pack_config(synth_manifest, tmp_path / "run")
    pack_data(config, tmp_path / "pack", workers=1, shard_size=80)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json", exclude={"trainer": {"overwrite"}})))
    built: list[object] = []
    # prepare_data calls the open_pack it imported (mmfuse.engine.data), so that is the name to count
    monkeypatch.setattr(data_module, "open_pack", lambda *a: built.append(a) or open_pack(*a))
    result = CliRunner().invoke(app, ["bench", "-c", str(path), "--methods", "concat", "--seeds", "1", "--no-unimodal",
                                      "--out", str(tmp_path / "bench"), "--set", f"data.pack={tmp_path / 'pack'}",
                                      "--set", "trainer.max_epochs=1"])
    assert result.exit_code == 0, result.output
    assert len(built) == 1 and (tmp_path / "bench" / "runs.csv").is_file()


def test_packing_without_the_pack_extra_says_which_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "webdataset" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the pack extra: pip install 'mmfuse\[pack\]'"):
        pack_module.pack_data(None, tmp_path / "pack")  # type: ignore[arg-type]
    assert not (tmp_path / "pack").exists()


def test_a_pack_from_before_digests_is_refused_and_packing_rewrites_it(synth_manifest: Path, tmp_path: Path) -> None:
    """Indexes written before shards carried digests (and member layouts) cannot prove their bytes: reading
    them is refused with the fix, and `mmfuse data pack` on the folder writes the pack a fresh one is."""
    config = pack_config(synth_manifest, tmp_path / "run")
    pack_data(config, tmp_path / "fresh", workers=1, shard_size=50)
    pack_data(config, tmp_path / "pack", workers=1, shard_size=50)
    for index in (tmp_path / "pack").glob("*.index.json"):
        state = json.loads(index.read_text())
        for key in ("layouts", "sha256", "members", "first_key"):
            del state[key]
        index.write_text(json.dumps(state))
    state = json.loads((tmp_path / "pack" / "pack.json").read_text())
    del state["shard_size"]
    (tmp_path / "pack" / "pack.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match=r"test-00000\.tar has no digest in its index \(written before packs carried "
                                        r"digests\); run `mmfuse data pack` again with the same config and --out"):
        open_pack(config, tmp_path / "pack")
    result = pack_data(config, tmp_path / "pack", workers=1, shard_size=50)
    assert result.shards_written == 5 and not result.already_packed
    assert files_of(tmp_path / "pack") == files_of(tmp_path / "fresh")
    assert len(open_pack(config, tmp_path / "pack").datasets["train"]) == 128
