"""``mmfuse train --ray-workers N``: the existing DDP run, its ranks started on a Ray cluster instead of by torchrun.

Why launch and not Ray Train's own trainer: a user who packed on Ray (``mmfuse data pack --engine
ray``) should not have to leave Ray to train, but the run must stay the run every other launcher
gives (same loader, checkpoints, resume, rank-zero outputs), so Ray does exactly what torchrun does
and nothing more: one actor per rank, placed by a placement group (``SPREAD`` over nodes by
default), each starting ``mmfuse train`` as a child process (an argument list, never a shell) with
the environment torchrun would give it: ``MASTER_ADDR``/``MASTER_PORT`` of rank 0's node,
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``/``NODE_RANK``. Lightning
recognises a torchelastic-style launch from these and joins the ranks instead of starting its own;
``trainer.devices`` and ``trainer.num_nodes`` are set to what was placed. The result is the torchrun
run's (tested: same weights and metrics).

Rank 0's output is printed by the driver; a rank that fails ends the launch with its last lines. The
run folder must be on a disk every node sees (rank 0 writes it; every rank reads the checkpoint on
resume), and so must the data, or use a pack URL (``data.pack: s3://...``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmfuse.core.errors import ConfigError, MMFuseError

TAIL = 4000


@dataclass
class RankResult:
    rank: int
    node: str
    returncode: int
    stdout: str
    stderr: str


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("training on a Ray cluster needs Ray: pip install 'mmfuse[ray]'") from None
    return ray


def rank_environments(nodes: Sequence[str], master_address: str, master_port: int) -> list[dict[str, str]]:
    """The torchrun environment of each rank, given the node (id) each rank was placed on: node ranks in
    order of first appearance, local ranks within a node, rank 0's node (at ``master_address``) as the master."""
    order: list[str] = []
    for node in nodes:
        if node not in order:
            order.append(node)
    local_sizes = {node: list(nodes).count(node) for node in order}
    seen: dict[str, int] = {}
    out = []
    for rank, node in enumerate(nodes):
        local = seen.get(node, 0)
        seen[node] = local + 1
        out.append({"MASTER_ADDR": master_address, "MASTER_PORT": str(master_port), "WORLD_SIZE": str(len(nodes)),
                    "RANK": str(rank), "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(local_sizes[node]),
                    "GROUP_RANK": str(order.index(node)), "NODE_RANK": str(order.index(node)),
                    "TORCHELASTIC_RUN_ID": "mmfuse-ray"})
    return out


def trainer_overrides(nodes: Sequence[str]) -> list[str]:
    """``--set`` arguments matching what was placed: every node must hold as many ranks (as torchrun needs)."""
    counts = {node: list(nodes).count(node) for node in nodes}
    if len(set(counts.values())) != 1:
        raise MMFuseError(f"Ray placed the ranks unevenly over nodes ({counts}); DDP needs the same number of ranks "
                          "per node: choose --ray-workers as a multiple of the nodes, or --ray-placement pack")
    per_node = next(iter(counts.values()))
    return ["--set", f"trainer.devices={per_node}", "--set", f"trainer.num_nodes={len(counts)}",
            "--set", "trainer.strategy=ddp"]


def launch(train_args: Sequence[str], workers: int, address: str | None = None, cpus_per_worker: float = 1,
           gpus_per_worker: float = 0, placement: str = "spread") -> list[RankResult]:
    """Runs ``mmfuse train <train_args>`` as ``workers`` DDP ranks on the Ray cluster at ``address`` (a new
    local one when None); returns each rank's result, rank 0 first."""
    ray = _ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(1, int(workers * cpus_per_worker))}))
    bundle: dict[str, float] = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    group = placement_group([bundle] * workers, strategy="SPREAD" if placement == "spread" else "PACK")
    try:
        ray.get(group.ready(), timeout=120)
        actor = ray.remote(_Rank)
        ranks = [actor.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
                 for i in range(workers)]
        placed = ray.get([r.node.remote() for r in ranks])
        nodes = [node_id for node_id, _ in placed]
        port = ray.get(ranks[0].free_port.remote(placed[0][1]))
        command = ["train", *train_args, *trainer_overrides(nodes)]
        envs = rank_environments(nodes, placed[0][1], port)
        results = ray.get([r.run.remote(command, env) for r, env in zip(ranks, envs, strict=True)])
    finally:
        remove_placement_group(group)
        if started:
            ray.shutdown()
    return [RankResult(i, f"{placed[i][1]} (node {placed[i][0][:8]})", *result) for i, result in enumerate(results)]


class _Rank:
    """One DDP rank's actor: where it runs, and the ``mmfuse train`` child it starts there."""

    def node(self) -> tuple[str, str]:
        """(node id, the address the node was started with: ``--node-ip-address``, as the cluster knows it)."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
        return str(node_id), str(address)

    def free_port(self, address: str) -> int:
        with socket.socket() as probe:
            probe.bind((address, 0))
            return int(probe.getsockname()[1])

    def run(self, command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, "-m", "mmfuse.cli", *command], env={**os.environ, **env},
                              capture_output=True, text=True)
        return done.returncode, done.stdout, done.stderr[-TAIL:]
