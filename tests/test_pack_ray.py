"""``mmfuse data pack --engine ray`` (issue 32) on a real two-node Ray cluster started here, every node on
127.0.0.1: the pack is the local pack byte for byte, into a folder and to S3 (moto on 127.0.0.1).
Why that cluster and how it stays on loopback: tests/ray_cluster.py."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pack_helpers import config_file, digests, whole_pack
from ray_cluster import local_ray_cluster
from s3_helpers import moto_s3, objects
from test_pack import pack_config
from typer.testing import CliRunner

from mmfuse.cli import app


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The S3 server, started before the nodes: their processes take its AWS_* settings (and the cache home
    holding the staging folders) from the environment, as a real cluster's nodes take their credentials."""
    with moto_s3("ray-packs", {"MMFUSE_CACHE": str(tmp_path_factory.mktemp("cache-home"))}) as client:
        yield client


@pytest.fixture(scope="module")
def cluster(s3: Any) -> Iterator[str]:
    """Two Ray nodes of one CPU each on 127.0.0.1 (tests/ray_cluster.py), started after the S3 server."""
    with local_ray_cluster(nodes=2) as address:
        yield address


@pytest.fixture(scope="module")
def local_pack(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return whole_pack(synth_manifest, tmp_path_factory.mktemp("local"))


def test_ray_on_two_nodes_packs_the_local_bytes_into_a_folder_and_to_s3(
        cluster: str, s3: Any, synth_manifest: Path, local_pack: Path, tmp_path: Path) -> None:
    import ray

    path = config_file(pack_config(synth_manifest, tmp_path / "run"), tmp_path / "cfg.yaml")
    common = ["data", "pack", "-c", str(path), "--shard-size", "20", "--engine", "ray", "--address", cluster]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "pack")])
    assert result.exit_code == 0, result.output
    assert "9 shards written" in " ".join(result.output.split())
    assert digests(tmp_path / "pack") == digests(local_pack)
    assert not ray.is_initialized()  # the driver let go of the cluster
    result = CliRunner().invoke(app, [*common, "--out", "s3://ray-packs/p"])
    assert result.exit_code == 0, result.output
    remote = {name: hashlib.sha256(data).hexdigest() for name, data in objects(s3, "ray-packs", "p").items()}
    assert remote == digests(local_pack)


def test_ray_missing_or_unreachable_is_one_line(synth_manifest: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    path = config_file(pack_config(synth_manifest, tmp_path / "run"), tmp_path / "cfg.yaml")
    real_import: Any = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = CliRunner().invoke(app, ["data", "pack", "-c", str(path), "--out", str(tmp_path / "p"), "--engine", "ray"])
    assert result.exit_code == 1 and "pip install 'mmfuse[ray]'" in result.output
