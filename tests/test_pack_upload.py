"""``mmfuse data pack --out s3://...`` (issue 32): packed to an S3 API server (moto, on 127.0.0.1) the
objects are the local pack's files byte for byte, ``open_pack`` reads the local pack's samples from
them, and a pack killed with kill -9 mid-upload skips, when run again, the shards already uploaded."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pack_helpers import cli, config_file, digests, whole_pack
from s3_helpers import moto_s3, objects
from test_pack import pack_config
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.engine import pack_upload
from mmfuse.engine.pack_open import open_pack

BUCKET = "out-packs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The server, with the cache home (where the staging folders live) a fresh folder."""
    with moto_s3(BUCKET, {"MMFUSE_CACHE": str(tmp_path_factory.mktemp("cache-home"))}) as client:
        yield client


@pytest.fixture(scope="module")
def local_pack(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return whole_pack(synth_manifest, tmp_path_factory.mktemp("local"))


def _sha(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_a_pack_uploaded_to_s3_is_the_local_pack_and_reads_its_samples(synth_manifest: Path, local_pack: Path,
                                                                       s3: Any, tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    path = config_file(config, tmp_path / "cfg.yaml")
    args = ["data", "pack", "-c", str(path), "--out", f"s3://{BUCKET}/whole", "--workers", "2", "--shard-size", "20"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _sha(objects(s3, BUCKET, "whole")) == digests(local_pack)  # pack.partial.json gone, nothing else there
    remote, local = open_pack(config, f"s3://{BUCKET}/whole"), open_pack(config, local_pack)
    for split in ("train", "val", "test"):
        ours, theirs = remote.datasets[split], local.datasets[split]
        assert len(ours) == len(theirs)
        for i in range(len(theirs)):
            a, b = ours[i], theirs[i]
            assert a.id == b.id and torch.equal(a.target, b.target)  # type: ignore[arg-type]
            for m, inputs in b.inputs.items():
                for name, tensor in (inputs or {}).items():
                    assert torch.equal(a.inputs[m][name], tensor)  # type: ignore[index]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "already a pack of this data" in " ".join(again.output.split())


def test_a_killed_upload_run_again_skips_the_uploaded_shards(synth_manifest: Path, local_pack: Path, s3: Any,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    path = config_file(config, tmp_path / "cfg.yaml")
    url = f"s3://{BUCKET}/killed"
    process = cli("data", "pack", "-c", str(path), "--out", url, "--workers", "1", "--shard-size", "20", delay=1.0)
    try:
        deadline = time.monotonic() + 120
        while "train-00000.tar.index.json" not in objects(s3, BUCKET, "killed") and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
    finally:
        output = process.communicate()[0]
    assert process.returncode == -signal.SIGKILL, output
    uploaded = objects(s3, BUCKET, "killed")
    assert "pack.json" not in uploaded and "pack.partial.json" in uploaded
    for name in uploaded:  # an index that is there means its tar is whole
        if name.endswith(".index.json"):
            tar = name.removesuffix(".index.json")
            assert hashlib.sha256(uploaded[tar]).hexdigest() == digests(local_pack)[tar]
    real, calls = pack_upload.upload_shard, []

    def spy(folder: Path, name: str, to: str) -> bool:
        calls.append((name, real(folder, name, to)))
        return calls[-1][1]

    monkeypatch.setattr(pack_upload, "upload_shard", spy)
    pack_upload.pack_to_url(config, url, workers=1, shard_size=20)
    before = {name.removesuffix(".index.json") for name in uploaded if name.endswith(".index.json")}
    sent = {name for name, fresh in calls if fresh}
    assert {"test-00000.tar", "train-00000.tar"} <= before and not before & sent  # uploaded once, not again
    assert before | sent == {name for name in digests(local_pack) if name.endswith(".tar")}
    assert _sha(objects(s3, BUCKET, "killed")) == digests(local_pack)
