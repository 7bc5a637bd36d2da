"""A local Ray cluster of several nodes for tests, every node on 127.0.0.1 only.

Why not ``ray start --node-ip-address 127.0.0.1``: Ray (2.60) replaces a loopback node address with the
machine's own IP (ray-project/ray#26293, #59110), so ``ray start`` nodes would listen on, and talk to,
the machine's network address. Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``) starts
each node (GCS, raylet, object store) as separate processes with the address it is given; and
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps drivers connecting to it (``ray.init(address=...)`` in the
processes a test starts) on the loopback address instead of resolving it to the machine's IP.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@contextmanager
def local_ray_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[str]:
    """Starts ``nodes`` Ray nodes on 127.0.0.1 (dashboard off, bounded CPUs and memory); yields the address
    for ``ray.init``/``--address``; stops every node after. The environment of processes started inside
    (``os.environ``) carries ``LOOPBACK_ENV``."""
    saved = {key: os.environ.get(key) for key in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)
    from ray._common.utils import get_default_ray_temp_dir
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read from the variable at import: Ray may be imported already

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)  # where Ray notes the newest cluster's address
    temp = tempfile.mkdtemp(prefix="/tmp/mray-")  # short: Ray's socket paths must fit in 107 bytes
    memory = 512 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": temp,
        "object_store_memory": 100 * 1024 * 1024, "memory": memory})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1",
                             object_store_memory=100 * 1024 * 1024, memory=memory)
        cluster.wait_for_nodes()
        yield str(cluster.address)
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
