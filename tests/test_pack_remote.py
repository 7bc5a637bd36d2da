"""Packs on object storage and web servers, read through fsspec (issue 30): an S3 API server (moto, in
server mode) and an HTTP server, both started here on 127.0.0.1, serve a pack that evaluates to the
local pack's metrics; a hostile shard name is refused before any shard is requested and runs nothing;
a tampered shard is named with its member."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from s3_helpers import moto_s3
from test_pack import pack_config
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack
from mmfuse.model import MultimodalModel


@pytest.fixture(scope="module")
def pack_and_model(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("remote")
    config = pack_config(synth_manifest, root / "run")
    pack_data(config, root / "pack", workers=1, shard_size=10)
    data = open_pack(config, root / "pack")
    MultimodalModel.from_config(config, data.preprocessor, data.task).save_pretrained(root / "model")
    return root / "pack", root / "model"


class _Logged(SimpleHTTPRequestHandler):
    requested: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        self.requested.append(self.path)


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, list[str]]]:
    """A folder served over HTTP on 127.0.0.1, its URL and the paths requested so far."""
    root = tmp_path_factory.mktemp("www")
    requested: list[str] = []
    handler = type("Handler", (_Logged,), {"requested": requested})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", requested
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """An S3 API server (moto) on 127.0.0.1 with a bucket 'packs'; AWS_* point boto3 and s3fs at it."""
    with moto_s3("packs") as client:
        yield client


def _upload(client: Any, folder: Path, prefix: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "packs", f"{prefix}/{path.relative_to(folder)}")


def _evaluate(model: Path, location: str, out: Path | None = None) -> tuple[int, str]:
    args = ["evaluate", "-m", str(model), "--pack", location, "--threads", "1"]
    result = CliRunner().invoke(app, args + (["--json", str(out)] if out else []))
    return result.exit_code, " ".join(result.output.split())


def _hostile(pack: Path, into: Path, marker: Path) -> Path:
    shutil.copytree(pack, into)
    state = json.loads((into / "pack.json").read_text())
    state["shards"]["test"][1] = f"test-00001.tar; touch {marker}"
    (into / "pack.json").write_text(json.dumps(state))
    return into


def test_a_pack_on_s3_and_over_http_evaluates_as_the_local_one(pack_and_model: tuple[Path, Path], s3: Any,
                                                              http_root: tuple[Path, str, list[str]],
                                                              tmp_path: Path) -> None:
    pack, model = pack_and_model
    assert _evaluate(model, str(pack), tmp_path / "local.json")[0] == 0
    local = json.loads((tmp_path / "local.json").read_text())
    _upload(s3, pack, "good")
    shutil.copytree(pack, http_root[0] / "good")
    for location in ("s3://packs/good", f"{http_root[1]}/good/"):
        code, output = _evaluate(model, location, tmp_path / "remote.json")
        assert code == 0, output
        assert json.loads((tmp_path / "remote.json").read_text()) == local


def test_a_hostile_shard_name_is_refused_before_any_shard_is_requested(pack_and_model: tuple[Path, Path], s3: Any,
                                                                       http_root: tuple[Path, str, list[str]],
                                                                       tmp_path: Path) -> None:
    pack, model = pack_and_model
    marker = tmp_path / "created"
    hostile = _hostile(pack, tmp_path / "hostile", marker)
    _upload(s3, hostile, "hostile")
    shutil.copytree(hostile, http_root[0] / "hostile")
    requested = http_root[2]
    requested.clear()
    refused = "shard name 'test-00001.tar; touch"
    for location in (str(hostile), f"file://{hostile}", "s3://packs/hostile", f"{http_root[1]}/hostile"):
        code, output = _evaluate(model, location)
        assert code == 1 and refused in output and "is not the pack's own 'test-00001.tar'; refusing the pack" in output
    assert set(requested) == {"/hostile/pack.json"}  # nothing but pack.json was fetched (a HEAD and a GET)
    assert not marker.exists()
    code, output = _evaluate(model, f"pipe:cat {hostile}/{{}}")
    assert code == 1 and "pipe: commands are not run" in output and not marker.exists()


def test_a_tampered_shard_on_s3_is_named_with_its_member(pack_and_model: tuple[Path, Path], s3: Any,
                                                         tmp_path: Path) -> None:
    pack, model = pack_and_model
    tampered = tmp_path / "tampered"
    shutil.copytree(pack, tampered)
    shard = tampered / "test-00001.tar"
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0x01
    shard.write_bytes(bytes(data))
    _upload(s3, tampered, "tampered")
    code, output = _evaluate(model, "s3://packs/tampered")
    assert code == 1 and "Traceback" not in output
    assert "pack shard s3://packs/tampered/test-00001.tar is damaged: member 0000000010." in output
    assert "does not match the digest in its index" in output
