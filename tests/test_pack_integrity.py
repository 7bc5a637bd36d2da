"""Packs prove their bytes (issue 30): a flipped byte anywhere in a shard stops training and evaluation
with the shard and member named, `mmfuse data verify` finds it, `mmfuse data pack` repairs it to the bytes
of a clean pack; hostile indexes are refused before any read; a folder has one writer at a time; a killed
or stopped pack leaves no worker behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from test_pack import files_of, pack_config
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.config import ExperimentConfig
from mmfuse.core.errors import DataError
from mmfuse.core.folder_lock import FolderBusy, folder_lock
from mmfuse.data import pack_format, pack_integrity
from mmfuse.engine.data import prepare_data
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack
from mmfuse.engine.pack_verify import verify_pack
from mmfuse.model import MultimodalModel


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own record of verified shards (on disk and in this process)."""
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pack_integrity, "_VERIFIED", set())


@pytest.fixture(scope="module")
def clean(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, Path, Path]:
    """A pack of the synthetic set (shards of 40), its config (YAML too) and an untrained model saved
    with the pack's preprocessing (evaluation needs a model, not a good one)."""
    root = tmp_path_factory.mktemp("integrity")
    config = pack_config(synth_manifest, root / "run")
    pack_data(config, root / "clean", workers=1, shard_size=40)
    data = open_pack(config, root / "clean")
    MultimodalModel.from_config(config, data.preprocessor, data.task).save_pretrained(root / "model")
    (root / "config.yaml").write_text(json.dumps(config.model_dump(mode="json", exclude={"trainer": {"overwrite"}})))
    return config, root / "clean", root / "model"


def _member_at(shard: Path, position: int) -> str | None:
    """The tar member whose header blocks or padded data hold byte ``position`` (read with tarfile, apart from
    the code under test); None for the closing blocks."""
    previous = 0
    with tarfile.open(shard) as tar:
        for info in tar:
            end = info.offset_data + -(-info.size // 512) * 512
            if previous <= position < end:
                return info.name
            previous = end
    return None


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def _positions(shard: Path) -> dict[str, int]:
    with tarfile.open(shard) as tar:
        members = list(tar)
    image = next(m for m in members[20:] if ".image." in m.name)
    return {"array data": image.offset_data + image.size // 2,  # a pixel of a sample in the middle
            "tar header": members[7].offset + 100,  # a header's mode field
            "closing blocks": shard.stat().st_size - 10}


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar*"))}


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("where", ["array data", "tar header", "closing blocks"])
def test_a_flipped_byte_anywhere_is_named_found_and_repaired(clean: tuple[ExperimentConfig, Path, Path],
                                                             tmp_path: Path, where: str) -> None:
    config, clean_pack, model = clean
    pack = tmp_path / "pack"
    shutil.copytree(clean_pack, pack)
    shard = pack / "train-00001.tar"
    position = _positions(shard)[where]
    member = _member_at(shard, position)
    assert (member is None) == (where == "closing blocks")
    _flip(shard, position)
    part = (rf"member {re.escape(member)} \(sample \d+, bytes \d+-\d+\)" if member
            else r"the tar's closing blocks \(bytes \d+-\d+\)")
    named = rf"pack shard .*train-00001\.tar is damaged: {part} does not match the digest in its index"

    # Training (data.pack) stops before a sample is read, naming shard and member.
    packed = config.model_copy(update={"data": config.data.model_copy(update={"pack": pack})})
    with pytest.raises(DataError, match=named + r"; run `mmfuse data pack` again with the same config and --out"):
        prepare_data(packed)
    # Evaluation from the folder and streamed from a URL: one line, exit 1.
    for location in (str(pack), f"file://{pack}"):
        code, output = _cli("evaluate", "-m", str(model), "--pack", location, "--split", "train", "--threads", "1")
        assert code == 1 and "Traceback" not in output, output
        assert re.search(named, output), output
    # The whole-pack check names it and fails; packing again repairs only that shard, to a clean pack's bytes.
    code, output = _cli("data", "verify", str(pack))
    assert code == 1 and re.search(r"damaged: " + named, output), output
    assert "1 of 6 shards" in output
    code, output = _cli("data", "pack", "-c", str(clean_pack.parent / "config.yaml"), "--out", str(pack),
                        "--workers", "1", "--shard-size", "40")
    assert code == 0 and "repairing: pack shard train-00001.tar is damaged" in output, output
    assert "1 shards written, 5 kept" in output
    assert _sha256s(pack) == _sha256s(clean_pack) and files_of(pack) == files_of(clean_pack)
    assert verify_pack(pack).damaged == {}
    code, output = _cli("data", "verify", str(pack))
    assert code == 0 and output.startswith(f"{pack}: all 6 shards match their digests ("), output


def test_a_verified_shard_is_not_hashed_again_but_data_verify_always_hashes(
        clean: tuple[ExperimentConfig, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, clean_pack, _ = clean
    pack = tmp_path / "pack"
    shutil.copytree(clean_pack, pack)
    open_pack(config, pack)
    stamps = list((tmp_path / "cache" / "verified").rglob("*.txt"))
    assert sorted(p.name for p in stamps) == sorted(f"{p.name}.txt" for p in pack.glob("*.tar"))
    # A new process (no in-memory record) trusts the stamps: no shard is read to be hashed.
    monkeypatch.setattr(pack_integrity, "_VERIFIED", set())
    opened: list[str] = []

    def counting(path: Path, *args: object) -> object:
        opened.append(Path(path).name)
        return open(path, *args)  # type: ignore[call-overload]

    monkeypatch.setattr(pack_integrity, "open", counting, raising=False)
    open_pack(config, pack)
    assert opened == []  # no shard was read to be hashed
    monkeypatch.setattr(pack_integrity, "_VERIFIED", set())
    (stamps[0]).unlink()
    open_pack(config, pack)
    assert opened == [stamps[0].name.removesuffix(".txt")]  # the one whose stamp is gone
    monkeypatch.undo()
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    # A change that keeps the size and modification time is what the cache cannot see; verify can.
    shard = pack / "val-00000.tar"
    stat = shard.stat()
    _flip(shard, 5000)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    open_pack(config, pack)
    assert list(verify_pack(pack).damaged) == ["val-00000.tar"]
    # A rewritten shard (new mtime) is hashed again.
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    monkeypatch.setattr(pack_integrity, "_VERIFIED", set())
    with pytest.raises(DataError, match=r"val-00000\.tar is damaged: member \d{10}\.\w+"):
        open_pack(config, pack)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update(spans=[[0, 10**15], *s["spans"][1:]]), r"sample span 0-1000000000000000 is not inside"),
    (lambda s: s.update(bytes=-1), r"negative size"),
    (lambda s: s["layouts"][0].append(["x.npy", 0, 10**12]), r"a member of the sample at bytes 0-\d+ lies outside it"),
    (lambda s: s.update(sha256="../../etc"), r"sha256 is not a SHA-256 hex digest"),
    (lambda s: s["members"].pop(), r"member digests do not match the member layouts"),
    (lambda s: s.update(spans="x"), r"ValueError"),
])
def test_a_hostile_index_is_refused_before_any_read(clean: tuple[ExperimentConfig, Path, Path], tmp_path: Path,
                                                    edit: object, message: str) -> None:
    config, clean_pack, _ = clean
    pack = tmp_path / "pack"
    shutil.copytree(clean_pack, pack)
    path = pack / "test-00000.tar.index.json"
    state = json.loads(path.read_text())
    edit(state)  # type: ignore[operator]
    path.write_text(json.dumps(state))
    with pytest.raises(DataError, match=r"test-00000\.tar\.index\.json: unreadable shard index \(.*" + message):
        open_pack(config, pack)


def test_an_index_larger_than_any_index_is_not_read(clean: tuple[ExperimentConfig, Path, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, clean_pack, _ = clean
    path = clean_pack / "test-00000.tar.index.json"
    assert pack_format.ShardIndex.read(path).name == "test-00000.tar"
    monkeypatch.setattr(pack_format, "MAX_INDEX_BYTES", path.stat().st_size - 1)
    with pytest.raises(DataError, match=rf"index\.json: unreadable shard index \({path.stat().st_size:,} bytes, more "
                                        rf"than an index can be \({path.stat().st_size - 1:,}\)\)"):
        pack_format.ShardIndex.read(path)


@pytest.mark.parametrize("name", ["test-00000.tar; touch {marker}", "../../test-00000.tar", "test-0.tar",
                                  "test-00000.tar?x=1", "test-00001.tar"])
def test_a_pack_json_with_a_foreign_shard_name_is_refused(clean: tuple[ExperimentConfig, Path, Path], tmp_path: Path,
                                                          name: str) -> None:
    config, clean_pack, model = clean
    pack = tmp_path / "pack"
    shutil.copytree(clean_pack, pack)
    marker = tmp_path / "created"
    state = json.loads((pack / "pack.json").read_text())
    state["shards"]["test"] = [name.format(marker=marker)]
    (pack / "pack.json").write_text(json.dumps(state))
    refused = r"shard name .* is not the pack's own 'test-00000\.tar'; refusing the pack"
    with pytest.raises(DataError, match=refused):
        open_pack(config, pack)
    for location in (str(pack), f"file://{pack}"):
        code, output = _cli("evaluate", "-m", str(model), "--pack", location)
        assert code == 1 and re.search(refused, output), output
    assert not marker.exists()


def _slow_pack(config_yaml: Path, out: Path, workers: int) -> subprocess.Popen[bytes]:
    """`mmfuse data pack` in its own process, each shard slowed to 0.5 s so that it is caught half-way."""
    script = ("import sys, time\nfrom mmfuse.engine import pack\nreal = pack.write_shard\n"
              "def slow(*a):\n    out = real(*a)\n    time.sleep(0.5)\n    return out\n"
              "pack.write_shard = slow\nfrom mmfuse.cli import main\nsys.argv = sys.argv[1:]\nmain()\n")
    return subprocess.Popen([sys.executable, "-c", script, "mmfuse", "data", "pack", "-c", str(config_yaml),
                             "--out", str(out), "--workers", str(workers), "--shard-size", "10"],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _whole(config: ExperimentConfig, tmp_path: Path) -> Path:
    pack_data(config, tmp_path / "whole", workers=1, shard_size=10)
    return tmp_path / "whole"


def _workers_of(process: subprocess.Popen[bytes], count: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = psutil.Process(process.pid).children()
        if len(children) >= count:
            return children
        time.sleep(0.05)
    raise AssertionError(f"the pack never started {count} workers")


def _first_shard(folder: Path) -> None:
    deadline = time.monotonic() + 60
    while not list(folder.glob("*.index.json")) and time.monotonic() < deadline:
        time.sleep(0.05)


def _gone(workers: list[psutil.Process], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers):
            return True
        time.sleep(0.1)
    return False


def test_a_pack_killed_with_sigkill_leaves_no_worker_and_a_second_writer_is_refused(
        clean: tuple[ExperimentConfig, Path, Path], tmp_path: Path) -> None:
    config, clean_pack, _ = clean
    out = tmp_path / "pack"
    process = _slow_pack(clean_pack.parent / "config.yaml", out, workers=2)
    try:
        workers = _workers_of(process, 2)
        with pytest.raises(FolderBusy, match=rf"{re.escape(str(out))} is being written by pid {process.pid} on .*"
                                             r"mmfuse data pack .*"
                                             r"wait for it to finish or use another folder \(packing refused\)"):
            pack_data(config, out, workers=1, shard_size=10)
        _first_shard(out)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert _gone(workers, within=5.0), [w.status() for w in workers if w.is_running()]
    result = pack_data(config, out, workers=1, shard_size=10)  # the kernel released the lock with the process
    assert result.shards_kept >= 1 and result.shards_written >= 1
    assert files_of(out) == files_of(_whole(config, tmp_path))


def test_a_pack_stopped_by_sigterm_says_how_to_resume_and_stops_its_workers(
        clean: tuple[ExperimentConfig, Path, Path], tmp_path: Path) -> None:
    config, clean_pack, _ = clean
    out = tmp_path / "pack"
    process = _slow_pack(clean_pack.parent / "config.yaml", out, workers=2)
    try:
        workers = _workers_of(process, 2)
        _first_shard(out)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    text = " ".join(stderr.decode().split())
    assert process.returncode == 143, text
    assert f"interrupted: stopped by SIGTERM; the finished shards in {out} are kept: run the same `mmfuse data pack` " \
           "command again to continue" in text and "Traceback" not in text
    assert _gone(workers, within=5.0)
    result = pack_data(config, out, workers=1, shard_size=10)
    assert result.shards_kept >= 1 and result.shards_written >= 1
    assert files_of(out) == files_of(_whole(config, tmp_path))


def test_a_second_training_into_a_run_folder_is_refused_in_one_line(clean: tuple[ExperimentConfig, Path, Path],
                                                                     tmp_path: Path) -> None:
    config, clean_pack, _ = clean
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom mmfuse.core.folder_lock import "
         "folder_lock\nwith folder_lock(Path(sys.argv[1]), 'training'):\n    print('held', flush=True)\n"
         "    time.sleep(60)\n", str(run)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        yaml = tmp_path / "config.yaml"
        state = config.model_dump(mode="json", exclude={"trainer": {"overwrite"}})
        state["data"]["pack"] = str(clean_pack)
        state["trainer"]["output_dir"] = str(run)
        yaml.write_text(json.dumps(state))
        code, output = _cli("train", "-c", str(yaml))
        assert code == 1 and "Traceback" not in output
        assert f"error: {run} is being written by pid {holder.pid} on " in output
        assert "wait for it to finish or use another folder (training refused)" in output
        assert not (run / "model").exists()
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(run, "training"):  # released with its holder
        pass


def test_a_missing_shard_and_a_garbled_index_are_repaired_too(clean: tuple[ExperimentConfig, Path, Path],
                                                               tmp_path: Path) -> None:
    config, clean_pack, _ = clean
    pack = tmp_path / "pack"
    shutil.copytree(clean_pack, pack)
    (pack / "train-00002.tar").unlink()
    (pack / "val-00000.tar.index.json").write_text('{"spans": [[0, 1e999]]')
    damaged = verify_pack(pack).damaged
    assert sorted(damaged) == ["train-00002.tar", "val-00000.tar"]
    assert "train-00002.tar is missing" in damaged["train-00002.tar"]
    assert "val-00000.tar.index.json: unreadable shard index" in damaged["val-00000.tar"]
    result = pack_data(config, pack, workers=2, shard_size=40)
    assert (result.shards_written, result.shards_kept, result.already_packed) == (2, 4, False)
    assert sorted(result.messages) == sorted(f"repairing: {why}" for why in damaged.values())
    assert _sha256s(pack) == _sha256s(clean_pack)
    again = pack_data(config, pack, workers=1, shard_size=40)
    assert again.already_packed and again.shards_written == 0
