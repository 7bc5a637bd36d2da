"""A pack written in parts (issue 32): two processes pack parts 0 and 1 of 2 into one folder at once and
``--finalize`` gives the local pack's bytes; finalizing early names the missing shards; a part killed
with kill -9 resumes; parts never delete another pack's shards nor run beside a whole pack; temporaries
of another host are never cleared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pack_helpers import cli, config_file, digests, whole_pack
from test_pack import pack_config

from mmfuse.core.atomic import host_tag, remove_stale_temporaries
from mmfuse.core.errors import DataError
from mmfuse.core.folder_lock import folder_lock, part_lock_name
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack
from mmfuse.engine.pack_parts import finalize_pack, pack_part

SHARDS = 9  # 128 train, 16 val, 16 test in shards of 20: 7 + 1 + 1


@pytest.fixture(scope="module")
def local_pack(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return whole_pack(synth_manifest, tmp_path_factory.mktemp("local"))


def _part_args(config: Path, out: Path, index: int) -> list[str]:
    return ["data", "pack", "-c", str(config), "--out", str(out), "--workers", "1", "--shard-size", "20",
            "--shard-index", str(index), "--shard-count", "2"]


def test_two_processes_pack_the_parts_at_once_and_finalize_gives_the_local_bytes(
        synth_manifest: Path, local_pack: Path, tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    path = config_file(config, tmp_path / "cfg.yaml")
    out = tmp_path / "parts"
    parts = [cli(*_part_args(path, out, index), delay=0.3) for index in (0, 1)]
    outputs = [process.communicate(timeout=180)[0] for process in parts]
    assert [process.returncode for process in parts] == [0, 0], outputs
    assert "packed part 0 of 2" in " ".join(outputs[0].split())
    assert not (out / "pack.json").exists()  # a part never finishes the pack
    result = finalize_pack(config, out, shard_size=20)
    assert sum(result.counts.values()) == 160 and result.shards_kept == SHARDS
    assert digests(out) == digests(local_pack)
    assert len(open_pack(config, out).datasets["train"]) == 128


def test_finalize_names_missing_shards_and_a_killed_part_resumes(synth_manifest: Path, local_pack: Path,
                                                                 tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    path = config_file(config, tmp_path / "cfg.yaml")
    out = tmp_path / "parts"
    process = cli(*_part_args(path, out, 0), delay=1.0)
    try:
        deadline = time.monotonic() + 120
        while not (out / "test-00000.tar.index.json").exists() and time.monotonic() < deadline:  # its first shard
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    with pytest.raises(DataError, match=r"8 of 9 shards of .* are not packed yet: train-00000.tar: missing; "
                                        r"train-00001.tar: missing; .*run their parts \(again\) first"):
        finalize_pack(config, out, shard_size=20)
    resumed = pack_part(config, out, 0, 2, workers=1, shard_size=20)
    assert resumed.shards_kept >= 1 and resumed.shards_kept + resumed.shards_written == 5  # positions 0, 2, 4, 6, 8
    assert not list(out.glob(".*tmp-*"))  # the killed part's temporaries (this host, its pid gone) were cleared
    with pytest.raises(DataError, match=r"4 of 9 shards .*train-00000.tar: missing; train-00002.tar: missing"):
        finalize_pack(config, out, shard_size=20)
    pack_part(config, out, 1, 2, workers=1, shard_size=20)
    finalize_pack(config, out, shard_size=20)
    assert digests(out) == digests(local_pack)


def test_parts_refuse_other_data_and_a_running_whole_pack(synth_manifest: Path, tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run")
    out = tmp_path / "parts"
    pack_part(config, out, 1, 3, workers=1, shard_size=20)
    shards = sorted(p.name for p in out.glob("*.tar"))
    other = pack_config(synth_manifest, tmp_path / "run", image={"size": 12})
    with pytest.raises(DataError, match=r"holds an unfinished pack of other data.*parts never delete"):
        pack_part(other, out, 0, 3, workers=1, shard_size=20)
    with pytest.raises(DataError, match=r"holds no parts of this pack"):
        finalize_pack(config, out, shard_size=40)
    assert sorted(p.name for p in out.glob("*.tar")) == shards  # nothing deleted
    # Another process holds part 2's lock (a part at work): finalizing and a whole pack are refused...
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from mmfuse.core.folder_lock import folder_lock\n"
                               f"with folder_lock(Path(sys.argv[1]), 'x', {part_lock_name(2, 3)!r}):\n"
                               "    print('held', flush=True)\n    time.sleep(60)\n", str(out)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        for refused in (lambda: finalize_pack(config, out, shard_size=20),
                        lambda: pack_data(config, out, workers=1, shard_size=20)):
            with pytest.raises(DataError, match=rf"being packed in parts \(part 2 of 3: pid {holder.pid} on "):
                refused()
        # ...and while a whole pack holds the folder, a part is refused in one line naming the holder's host.
        with folder_lock(out, "packing"):
            script = ("import sys\nfrom pathlib import Path\nfrom mmfuse.engine.pack_parts import pack_part\n"
                      "from test_pack import pack_config\ntry:\n"
                      f"    pack_part(pack_config(Path({str(synth_manifest)!r}), Path('r')), Path(sys.argv[1]), 0, 3)\n"
                      "except Exception as exc:\n    print(exc)\n")
            refusal = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
            assert f"is being written by pid {os.getpid()} on " in refusal.stdout, refusal
            assert "packing part 0 of 3 refused" in refusal.stdout
    finally:
        holder.kill()
        holder.wait()


def test_only_this_hosts_temporaries_of_dead_writers_are_cleared(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process here
    final = tmp_path / "train-00000.tar"
    mine = tmp_path / f".{final.name}.tmp-{dead.pid}@{host_tag()}-abc"
    legacy = tmp_path / f".{final.name}.tmp-{dead.pid}-def"  # from before temporaries named their host
    elsewhere = tmp_path / f".{final.name}.tmp-{dead.pid}@{host_tag()}x.cluster-ghi"  # in flight on another machine
    running = tmp_path / f".{final.name}.tmp-{os.getpid()}@{host_tag()}-jkl"
    for path in (mine, legacy, elsewhere, running):
        path.write_bytes(b"half")
    assert sorted(remove_stale_temporaries(final)) == sorted([mine, legacy])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([elsewhere.name, running.name])
    assert "-" not in host_tag() and "/" not in host_tag()
