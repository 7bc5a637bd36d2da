"""``mmfuse data pack --engine ray [--address ADDR]``: the shard plan packed by Ray Data tasks on a cluster.

Why it is a ``Runner`` and nothing more: the plan, the fitted preprocessing, the resume rules and
``pack.json`` stay ``mmfuse.engine.pack``'s, and each task packs its shard with the same
``_pack_shard`` the local pool runs, so both engines write the same bytes (tested: every file's
SHA-256). Ray only decides where each shard is packed: ``ray.data.from_items`` holds one row per
shard (its position in the list of shards to pack), one block each, and ``map`` runs a one-CPU task per
row, spread over the nodes; the shards themselves travel as the map function's argument, serialized by
Ray between the driver and its own workers (mmfuse unpickles nothing).

Where the shards go: into the output folder, which every node must see (a shared file system), or,
for a URL ``--out``, into each node's own staging folder, from which the task uploads the shard
itself (``mmfuse.engine.pack_upload``) and hands its index back to the driver. Every node needs mmfuse
and its dependencies installed, and the raw files readable at the paths the manifest names.

Ray is an optional extra, imported only here and only for ``--engine ray``. Usage statistics are off.
Without ``--address`` a local Ray is started (``--workers`` CPUs, no dashboard) and shut down after.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.errors import ConfigError, DataError, MMFuseError
from mmfuse.core.threads import usable_cores, whole_cores
from mmfuse.data.pack_format import INDEX_SUFFIX
from mmfuse.engine.pack import Context, Runner, _run, _Shard


def _ray() -> Any:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read when Ray starts or connects
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data: pip install 'mmfuse[ray]'") from None
    return ray


@contextlib.contextmanager
def connected(address: str | None, workers: int | None) -> Iterator[Any]:
    """Ray, connected to the cluster at ``address`` or to a local one started for the block."""
    ray = _ray()
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # a line per dataset run, not ours to print
    try:
        if ray.is_initialized():  # a caller (a notebook, a Ray job) connected already
            yield ray
            return
        with _started(ray, address, workers):
            yield ray
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def _started(ray: Any, address: str | None, workers: int | None) -> Iterator[None]:
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=workers or whole_cores(usable_cores()), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to Ray{f' at {address}' if address else ''}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _pack_row(row: dict[str, Any], shards: list[_Shard], context: Context, upload: str | None) -> dict[str, Any]:
    """One Ray task: the shard at ``row``'s position packed (and uploaded for a URL); errors come back as
    text, so the driver reports them in one line and Ray does not retry a shard that cannot be packed."""
    shard = shards[int(row["position"])]
    try:
        if upload is None:
            _run([shard], context, 1, lambda _: None, 0)
            return {"name": shard.name, "index": "", "error": ""}
        from mmfuse.engine.pack_upload import remote_fs, remote_text, staging_folder, upload_shard

        fs, root = remote_fs(upload)
        remote = remote_text(fs, f"{root}/{shard.name}{INDEX_SUFFIX}")
        if remote is None:  # pack.partial.json at the URL proved any index there is this pack's
            folder = staging_folder(upload)
            _run([shard], (*context[:3], folder), 1, lambda _: None, 0)
            upload_shard(folder, shard.name, upload)
            remote = (folder / (shard.name + INDEX_SUFFIX)).read_text()
        return {"name": shard.name, "index": remote, "error": ""}
    except MMFuseError as exc:
        return {"name": shard.name, "index": "", "error": str(exc)}


def ray_runner(address: str | None, upload: str | None = None) -> Runner:
    """The Runner that packs the shards on Ray (module docstring); ``upload``: the URL packed to, if any."""

    def run(todo: list[_Shard], context: Context, workers: int, report: Callable[[int], None], done: int) -> None:
        if not todo:
            return
        context = (*context[:3], Path(context[3]).resolve())  # a task's working folder is not the driver's
        with connected(address, workers) as ray:
            data_context = ray.data.DataContext.get_current()
            data_context.enable_progress_bars = False
            data_context.print_on_execution_start = False
            sizes = {shard.name: len(shard.records) for shard in todo}
            rows = [{"position": position} for position in range(len(todo))]
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
                _pack_row, fn_kwargs={"shards": todo, "context": context, "upload": upload}, num_cpus=1)
            for row in dataset.iter_rows():
                if row["error"]:
                    raise DataError(str(row["error"]))
                if upload is not None:  # the driver's copy of the index, for pack.json
                    write_text_atomic(Path(context[3]) / (row["name"] + INDEX_SUFFIX), str(row["index"]))
                done += sizes[row["name"]]
                report(done)

    return run
