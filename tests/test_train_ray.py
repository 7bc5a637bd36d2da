"""``mmfuse train --ray-workers``: the DDP run's ranks started on a Ray cluster of two nodes (started
here, on 127.0.0.1 only) end with torchrun's weights and metrics, one model folder, one report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_cluster import local_ray_cluster
from safetensors.torch import load_file
from serve_helpers import free_port
from test_distributed import write_config

import mmfuse
from mmfuse.core.errors import MMFuseError
from mmfuse.engine.ray_launch import rank_environments, trainer_overrides


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with local_ray_cluster(nodes=2, cpus_per_node=1) as address:
        yield address


def test_ray_ranks_on_two_nodes_equal_torchrun(cluster: str, synth_manifest: Path, tmp_path: Path) -> None:
    config = write_config(synth_manifest, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(mmfuse.__file__).parents[1])}
    on_ray = subprocess.run([sys.executable, "-m", "mmfuse.cli", "train", str(config), "--out", str(tmp_path / "ray"),
                             "--ray-workers", "2", "--ray-address", cluster],
                            capture_output=True, text=True, timeout=300, env=env)
    assert on_ray.returncode == 0, on_ray.stdout[-2000:] + on_ray.stderr[-3000:]
    nodes = on_ray.stdout.split("trained as 2 DDP ranks on Ray nodes", 1)[1]
    assert nodes.count("127.0.0.1 (node ") == 2 and "192." not in nodes, "one rank per node, both on loopback"
    assert on_ray.stdout.count("model saved to") == 1
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run(
        [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
         str(free_port()), "-m", "mmfuse.cli", "train", str(config), "--out", str(tmp_path / "torchrun"),
         "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"],
        capture_output=True, text=True, timeout=300, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("ray", "torchrun"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("ray", "torchrun")]
    for split in ("val", "test"):
        assert metrics[0][split] == pytest.approx(metrics[1][split], abs=1e-6)
    assert metrics[0]["epochs"] == metrics[1]["epochs"] == 3


def test_a_failing_rank_ends_the_launch_with_its_last_line(cluster: str, synth_manifest: Path, tmp_path: Path) -> None:
    config = write_config(synth_manifest, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(mmfuse.__file__).parents[1])}
    failed = subprocess.run([sys.executable, "-m", "mmfuse.cli", "train", str(config), "--out", str(tmp_path / "r"),
                             "--ray-workers", "2", "--ray-address", cluster,
                             "--set", f"data.manifest={tmp_path / 'nope.jsonl'}"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert failed.returncode == 1
    said = "".join(failed.stdout.split() + failed.stderr.split())  # rich wraps anywhere
    assert "rank0on127.0.0.1" in said and "nope.jsonl" in said and "Traceback" not in said


def test_rank_environments_are_torchruns() -> None:
    envs = rank_environments(["n1", "n2", "n1", "n2"], "10.0.0.5", 29400)
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [(e["GROUP_RANK"], e["LOCAL_RANK"]) for e in envs] == [("0", "0"), ("1", "0"), ("0", "1"), ("1", "1")]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs} == \
        {("10.0.0.5", "29400", "4", "2")}
    assert trainer_overrides(["n1", "n2", "n1", "n2"])[1::2] == ["trainer.devices=2", "trainer.num_nodes=2",
                                                                  "trainer.strategy=ddp"]
    with pytest.raises(MMFuseError, match=r"unevenly"):
        trainer_overrides(["n1", "n1", "n2"])
