"""``mmfuse data pack --out s3://bucket/prefix``: a pack written to object storage (any URL of
``mmfuse.core.locations.PROTOCOLS``), through fsspec's library calls (never a shell).

The shards are packed into a local staging folder (``$MMFUSE_CACHE/packs/staging-<digest of the URL>``:
the usual resumable pack, locked against a second packer on this machine) and each finished shard is
uploaded by the process that packed it, the ``.tar`` first, then its ``.index.json``. An object PUT is
atomic, so at the URL an index that is there means its tar is whole; an index is deleted before its
shard is uploaded again. ``files.json`` and the tokenizer files follow, ``pack.json`` last: a reader
(``mmfuse.engine.pack_open.open_pack``) sees a finished pack or none.

Resuming: ``pack.partial.json`` is uploaded first, with the pack's fingerprint. A rerun after a kill
finds it equal, keeps every shard whose remote index equals the local one (the local pack resumes as
usual), and uploads the rest. A URL holding another pack, finished or not, is refused unless
``--rebuild``, which deletes that pack's files first (``pack.json`` before anything else).

With ``--engine ray`` each Ray task packs its shards into the staging folder of the node it runs on and
uploads them itself (``mmfuse.engine.pack_ray``); a shard whose index is already at the URL is taken
as done (the partial fingerprint proved it is this pack's). The driver keeps only the indexes.

Two machines packing one URL at once are not detected (an object store has no locks): pack a URL from
one command, or in parts into a shared folder (``mmfuse.engine.pack_parts``) and copy it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

from mmfuse.config import ExperimentConfig
from mmfuse.core.cache_home import cache_dir
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.core.folder_lock import folder_lock
from mmfuse.core.locations import check_location
from mmfuse.data.pack_format import INDEX_SUFFIX, MAX_INDEX_BYTES, checked_shards
from mmfuse.engine import pack as pack_module
from mmfuse.engine.pack import DEFAULT_SHARD_SIZE, PackResult, Progress, Runner, _run, _Shard, pack_data
from mmfuse.engine.pack_fingerprint import FILES_FILE, differences, fingerprint, load_files
from mmfuse.engine.pack_open import PARTIAL_FILE
from mmfuse.engine.pack_verify import PACK_FILE
from mmfuse.engine.records import load_records, new_preprocessor

_URL: str | None = None
"""The URL the local pool's workers upload to (set before they fork)."""


def staging_folder(url: str) -> Path:
    """The local folder where the shards of the pack at ``url`` are packed before they are uploaded."""
    return cache_dir("packs") / f"staging-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def remote_fs(url: str) -> tuple[Any, str]:
    """fsspec's file system of ``url`` and the pack's root path in it; a missing backend is one line."""
    try:
        import fsspec
    except ImportError:
        raise ConfigError("packing to a URL uses fsspec: pip install 'mmfuse[remote]'") from None
    try:
        fs, root = fsspec.core.url_to_fs(check_location(url))
    except ImportError as exc:
        raise ConfigError(f"writing {url} needs {exc.name or 'the backend of its protocol'}: "
                          "pip install 'mmfuse[remote]' (gs:// also needs gcsfs)") from None
    return fs, str(root).rstrip("/")


def _call(what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with a backend's own error turned into one DataError line naming ``what``."""
    try:
        return fn(*args)
    except FileNotFoundError:
        raise
    except Exception as exc:  # each backend raises its own (ClientError, aiohttp errors...)
        raise DataError(f"cannot write {what}: {type(exc).__name__}: {exc}") from None


def remote_text(fs: Any, path: str) -> str | None:
    """The small file at ``path`` (an index, pack.json), or None when it is not there."""
    try:
        if _call(path, fs.size, path) > MAX_INDEX_BYTES:
            raise DataError(f"{path} is larger than {MAX_INDEX_BYTES:,} bytes: not a file of a pack")
        return bytes(_call(path, fs.cat_file, path)).decode()
    except FileNotFoundError:
        return None


def _remove(fs: Any, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _call(path, fs.rm_file, path)


def upload_shard(folder: Path, name: str, url: str) -> bool:
    """Uploads shard ``name`` from ``folder`` (tar, then index) unless the URL holds the same index;
    returns whether it uploaded."""
    fs, root = remote_fs(url)
    local = (folder / (name + INDEX_SUFFIX)).read_text()
    if remote_text(fs, f"{root}/{name}{INDEX_SUFFIX}") == local:
        return False
    _remove(fs, f"{root}/{name}{INDEX_SUFFIX}")  # no index ever names a tar being replaced
    _call(f"{url}/{name}", fs.put_file, str(folder / name), f"{root}/{name}")
    _call(f"{url}/{name}{INDEX_SUFFIX}", fs.pipe_file, f"{root}/{name}{INDEX_SUFFIX}", local.encode())
    return True


def _pack_and_upload(shard: _Shard) -> tuple[str, int, int]:
    """A local pool's job: the shard packed (``_pack_shard``), then uploaded by the same worker."""
    result = pack_module._pack_shard(shard)
    assert pack_module._WORKER is not None and _URL is not None
    upload_shard(pack_module._WORKER[3], shard.name, _URL)
    return result


def _clear_remote(fs: Any, root: str) -> None:
    """Deletes the pack at ``root`` (pack.json first: no reader trusts what follows), as ``_clear`` does locally."""
    _remove(fs, f"{root}/{PACK_FILE}")
    for path in _call(root, fs.find, root):
        name = path.rsplit("/", 1)[-1]
        if name in (PARTIAL_FILE, FILES_FILE) or name.endswith((".tar", INDEX_SUFFIX)) \
                or f"{root}/tokenizers/" in path:
            _remove(fs, path)


def pack_to_url(config: ExperimentConfig, url: str, workers: int | None = None, rebuild: bool = False,
                shard_size: int = DEFAULT_SHARD_SIZE, progress: Progress | None = None,
                ray_runner: Any = None) -> PackResult:
    """Packs the config's data to ``url`` (module docstring). ``ray_runner(url)``, when given, makes the
    Runner of Ray tasks that upload their own shards."""
    global _URL
    url = check_location(url).rstrip("/")
    fs, root = remote_fs(url)
    if "file" in fs.protocol:  # a local file system wants its folders made; an object store has none
        fs.makedirs(root, exist_ok=True)
    staging = staging_folder(url)
    with folder_lock(staging, f"packing {url}"):
        splits = load_records(config)
        current, _ = fingerprint(config, splits, new_preprocessor(config), load_files(staging))
        wanted = json.dumps({"fingerprint": current, "shard_size": shard_size})
        state_text = remote_text(fs, f"{root}/{PACK_FILE}")
        if state_text is not None and not rebuild:
            state = json.loads(state_text)
            if differences(state.get("fingerprint", {}), current, []):
                raise DataError(f"{url} holds a pack of other data or preprocessing; pass --rebuild to replace it")
            shards = sum(len(names) for names in checked_shards(state.get("shards"), f"{url}/{PACK_FILE}").values())
            return PackResult(Path(staging), state["counts"], state["skipped"], shards_kept=shards,
                              already_packed=True)
        if rebuild or remote_text(fs, f"{root}/{PARTIAL_FILE}") not in (None, wanted):
            if not rebuild:
                raise DataError(f"{url} holds an unfinished pack of other data, preprocessing or --shard-size; pass "
                                "--rebuild to replace it")
            _clear_remote(fs, root)
        _call(f"{url}/{PARTIAL_FILE}", fs.pipe_file, f"{root}/{PARTIAL_FILE}", wanted.encode())
        runner: Runner
        if ray_runner is not None:
            shutil.rmtree(staging / "tokenizers", ignore_errors=True)
            (staging / PACK_FILE).unlink(missing_ok=True)  # the driver's staging holds indexes only: always redone
            runner = ray_runner(url)
        else:
            _URL = url
            runner = partial(_run, job=_pack_and_upload)
        result = pack_data(config, staging, workers, rebuild, shard_size, progress, runner=runner)
        _publish(staging, fs, root, url, local_shards=ray_runner is None)
        return result


def _publish(staging: Path, fs: Any, root: str, url: str, local_shards: bool) -> None:
    """Uploads what a finished local pack has and the URL lacks, pack.json last, then drops the partial."""
    state_text = (staging / PACK_FILE).read_text()
    state = json.loads(state_text)
    if local_shards:  # shards kept from an earlier run were packed but maybe never uploaded
        for names in checked_shards(state["shards"], str(staging / PACK_FILE)).values():
            for name in names:
                upload_shard(staging, name, url)
    for path in sorted((staging / "tokenizers").rglob("*")) if (staging / "tokenizers").is_dir() else []:
        if path.is_file():
            relative = path.relative_to(staging).as_posix()
            if "file" in fs.protocol:
                fs.makedirs(f"{root}/{path.parent.relative_to(staging).as_posix()}", exist_ok=True)
            _call(f"{url}/{relative}", fs.put_file, str(path), f"{root}/{relative}")
    _call(f"{url}/{FILES_FILE}", fs.put_file, str(staging / FILES_FILE), f"{root}/{FILES_FILE}")
    _call(f"{url}/{PACK_FILE}", fs.pipe_file, f"{root}/{PACK_FILE}", state_text.encode())
    _remove(fs, f"{root}/{PARTIAL_FILE}")
