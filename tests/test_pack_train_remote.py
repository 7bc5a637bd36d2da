"""Training from a pack that is not where it was made (issue 32): on an S3 API server (moto, started
here on 127.0.0.1) through the bounded local shard cache, killed with -9 mid-epoch and resumed from
S3, or copied to another folder with the raw files gone. Each ends with the weights and metrics of
training from the local pack, bit for bit (CPU, one thread)."""

from __future__ import annotations

import csv
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_resume
import torch
import yaml
from s3_helpers import moto_s3
from test_resume import assert_same_result, checkpoint_step, runner, start_slow_run, wait_for_checkpoint

from mmfuse.cli import app
from mmfuse.config import load_config
from mmfuse.core.errors import DataError
from mmfuse.data.pack_cache import PackCache
from mmfuse.engine.loader import ShardOrder
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack, read_state

BUCKET = "train-packs"
small_manifest, config = test_resume.small_manifest, test_resume.config  # its 48-sample set and its config


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An S3 API server on 127.0.0.1 with one bucket; AWS_* point s3fs (and subprocesses) at it, and the
    cache home is a fresh folder so every test downloads what it reads."""
    with moto_s3(BUCKET, {"MMFUSE_CACHE": str(tmp_path_factory.mktemp("cache-home"))}) as client:
        yield client


@pytest.fixture(scope="module")
def packed(config: Path, bucket: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """test_resume's config packed in shards of 8 samples, in a local folder and uploaded to the bucket."""
    folder = tmp_path_factory.mktemp("local") / "pack"
    pack_data(load_config(config), folder, workers=1, shard_size=8)
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            bucket.upload_file(str(path), BUCKET, f"p/{path.relative_to(folder).as_posix()}")
    return folder, f"s3://{BUCKET}/p"


@pytest.fixture(scope="module")
def local_run(config: Path, packed: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("from-local") / "run"
    result = runner.invoke(app, ["train", str(config), "--out", str(run), "--pack", str(packed[0])])
    assert result.exit_code == 0, result.output
    return run


def test_training_from_s3_equals_training_from_the_local_pack(config: Path, packed: tuple[Path, str],
                                                               local_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--out", str(run), "--pack", packed[1]])
    assert result.exit_code == 0, result.output
    assert_same_result(run, local_run)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["pack"] == packed[1], "a URL stays a URL"


def test_kill_9_mid_epoch_then_resume_from_s3_equals_the_local_run(config: Path, packed: tuple[Path, str],
                                                                  local_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = start_slow_run(config, run, "--pack", packed[1])
    try:
        reached = wait_for_checkpoint(run / "checkpoints" / "last.ckpt", 16, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert reached == 16 == checkpoint_step(run / "checkpoints" / "last.ckpt"), "killed inside epoch 3"
    result = runner.invoke(app, ["train", str(config), "--resume", str(run), "--pack", packed[1]])
    assert result.exit_code == 0, result.output
    assert_same_result(run, local_run)


def test_a_copied_pack_trains_without_its_raw_files(config: Path, packed: tuple[Path, str], local_run: Path,
                                                    tmp_path: Path) -> None:
    """The config names a manifest that no longer exists (data moved away after packing); the pack, copied
    to another folder, is all the run needs."""
    copy = tmp_path / "elsewhere" / "pack"
    shutil.copytree(packed[0], copy)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["manifest"] = str(tmp_path / "gone" / "manifest.jsonl")
    moved = tmp_path / "config.yaml"
    moved.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(moved), "--out", str(run), "--pack", str(copy)])
    assert result.exit_code == 0, result.output
    assert_same_result(run, local_run)
    refused = runner.invoke(app, ["train", str(moved), "--out", str(tmp_path / "checked"), "--pack", str(copy),
                                  "--check-sources"])
    assert refused.exit_code != 0 and "gone" in "".join(refused.output.split())  # the manifest it could not read


def test_the_shard_cache_stays_within_its_limit_and_reads_the_same_samples(config: Path,
                                                                           packed: tuple[Path, str]) -> None:
    local_dir, url = packed
    shard = (local_dir / "train-00000.tar").stat().st_size
    limited = load_config(config, ["data.pack=" + json.dumps(url), f"data.pack_cache_gb={2.5 * shard / 2**30}"])
    remote, local = open_pack(limited, url).datasets["train"], open_pack(limited, local_dir).datasets["train"]
    state, raw = read_state(url)
    cache = PackCache(url, raw)
    held = []
    for i in range(len(local)):
        a, b = remote[i], local[i]
        assert a.id == b.id and all(torch.equal(a.inputs[m][k], b.inputs[m][k])  # type: ignore[index]
                                    for m in b.inputs if b.inputs[m] for k in b.inputs[m])  # type: ignore[union-attr]
        held.append(sum(p.stat().st_size for p in cache.folder.glob("*.tar")))
    assert max(held) <= 2.5 * shard, "never more than the limit on disk"
    assert len(state["shards"]["train"]) == 6 and min(held) > 0


def test_a_tampered_shard_in_the_bucket_is_refused_before_training(config: Path, packed: tuple[Path, str],
                                                                   bucket: Any, tmp_path: Path) -> None:
    data = bytearray((packed[0] / "train-00002.tar").read_bytes())
    data[2000] ^= 0x40
    bucket.put_object(Bucket=BUCKET, Key="tampered/train-00002.tar", Body=bytes(data))
    for path in packed[0].iterdir():
        if path.is_file() and path.name != "train-00002.tar" and not path.name.startswith("."):
            bucket.upload_file(str(path), BUCKET, f"tampered/{path.name}")
    url = f"s3://{BUCKET}/tampered"
    dataset = open_pack(load_config(config), url).datasets["train"]
    with pytest.raises(DataError, match=r"train-00002\.tar is damaged: member 00000000\d\d\."):
        [dataset[i] for i in range(len(dataset))]


def test_shard_order_deals_each_rank_its_own_shards() -> None:
    order = ShardOrder([8, 8, 8, 8, 8, 5], window=2)
    owner = {i: s for s, start in enumerate(order.starts) for i in range(start, start + order.sizes[s])}
    per_rank = [order.order(seed=3, epoch=1, rank=r, world=2) for r in range(2)]
    shards = [{owner[i] for i in o.tolist()} for o in per_rank]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(6)), "each shard read by one rank"
    assert len(per_rank[0]) == len(per_rank[1]) == order.per_rank(2, seed=3) == 24, "equal batch counts"
    again = [order.order(seed=3, epoch=2, rank=r, world=2) for r in range(2)]
    assert [{owner[i] for i in o.tolist()} for o in again] == shards, "the same share every epoch (cached once)"
    assert not torch.equal(again[0], per_rank[0]), "another order every epoch"
    assert torch.equal(order.order(seed=3, epoch=1, rank=0, world=2), per_rank[0]), "a function of (seed, epoch)"
    alone = order.order(seed=3, epoch=1, rank=0, world=1)
    assert sorted(alone.tolist()) == list(range(45))
    first_window = {owner[i] for i in alone[:13].tolist()}  # the smallest window: shards of 8 and 5
    assert len(first_window) == 2, "a window of two shards at a time"
    with pytest.raises(ValueError, match=r"6 shards for 8 ranks"):
        order.order(seed=3, epoch=1, rank=0, world=8)


def test_pack_order_shards_from_s3_equals_the_same_order_from_the_local_pack(
        config: Path, packed: tuple[Path, str], tmp_path: Path) -> None:
    runs = {}
    for name, location in (("local", str(packed[0])), ("s3", packed[1])):
        runs[name] = tmp_path / name
        result = runner.invoke(app, ["train", str(config), "--out", str(runs[name]), "--pack", location,
                                     "--set", "data.pack_order=shards", "--set", "trainer.max_epochs=2"])
        assert result.exit_code == 0, result.output
    assert_same_result(runs["s3"], runs["local"])


def test_a_damaged_cached_shard_is_downloaded_again(config: Path, packed: tuple[Path, str]) -> None:
    local_dir, url = packed
    train = open_pack(load_config(config), url).datasets["train"]
    first = train[0]
    cache = PackCache(url, read_state(url)[1])
    cached = cache.folder / "train-00000.tar"
    data = bytearray(cached.read_bytes())
    data[700] ^= 0x01  # same size; a later reader must not trust it
    cached.write_bytes(bytes(data))
    again = open_pack(load_config(config), url).datasets["train"][0]
    assert again.id == first.id and cached.read_bytes() == (local_dir / "train-00000.tar").read_bytes()


def test_an_index_that_disagrees_with_pack_json_is_refused(config: Path, packed: tuple[Path, str],
                                                           bucket: Any) -> None:
    state = json.loads((packed[0] / "pack.json").read_text())
    state["shard_sha256"]["train-00001.tar"] = "0" * 64
    for path in packed[0].iterdir():
        if path.is_file() and path.name != "pack.json" and not path.name.startswith("."):
            bucket.upload_file(str(path), BUCKET, f"rewritten/{path.name}")
    bucket.put_object(Bucket=BUCKET, Key="rewritten/pack.json", Body=json.dumps(state).encode())
    with pytest.raises(DataError, match=r"train-00001\.tar\.index\.json records another shard digest than .*pack"):
        open_pack(load_config(config), f"s3://{BUCKET}/rewritten")


def test_bench_from_s3_scores_as_bench_from_the_local_pack(config: Path, packed: tuple[Path, str],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mmfuse bench`` reads ``data.pack`` through the same door: a URL gives the local pack's scores."""
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache-home"))  # empty: what the URL run downloads shows
    scores = {}
    for name, location in (("local", str(packed[0])), ("s3", packed[1])):
        out = tmp_path / name
        result = runner.invoke(app, ["bench", "-c", str(config), "--methods", "concat,late", "--seeds", "1",
                                     "--no-unimodal", "--out", str(out), "--set", f"data.pack={location}"])
        assert result.exit_code == 0, result.output
        with (out / "runs.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["method"] for row in rows] == ["concat", "late"]
        scores[name] = [{k: v for k, v in row.items() if k not in ("train_seconds", "peak_memory_mb")} for row in rows]
        assert 0 <= float(scores[name][0]["accuracy"]) <= 1 and float(scores[name][0]["params"]) > 0
    assert scores["s3"] == scores["local"]
    downloaded = PackCache(packed[1], read_state(packed[1])[1]).folder
    assert (downloaded / "train-00000.tar").read_bytes() == (packed[0] / "train-00000.tar").read_bytes()
