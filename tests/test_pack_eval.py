"""``mmfuse evaluate --pack``: a pack's split (local or ``file://`` URL) gives the metrics the manifest
gives; ``pipe:`` is refused; a pack of other preprocessing is refused; ``data.pack`` refuses URLs with
what works. (S3 and HTTP locations: tests/test_pack_remote.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_pack import pack_config
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.config import validate_config
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.pack_stream import StreamedSplit, is_url, member_url
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_eval import pack_split_for_model
from mmfuse.model import MultimodalModel


@pytest.fixture(scope="module")
def packed_model(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pack of the synthetic set and a model trained (2 epochs) from it."""
    root = tmp_path_factory.mktemp("pack_eval")
    config = pack_config(synth_manifest, root / "run")
    pack_data(config, root / "pack", workers=1, shard_size=10)
    packed = config.model_copy(update={"data": config.data.model_copy(update={"pack": str(root / "pack")}),
                                       "trainer": config.trainer.model_copy(update={"max_epochs": 2})})
    fit(packed, prepare_data(packed))
    return root / "run" / "model", root / "pack"


def _metrics(args: list[str], out: Path) -> dict[str, float]:
    result = CliRunner().invoke(app, ["evaluate", *args, "--json", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(out.read_text()))


def test_evaluate_from_the_pack_equals_the_manifest(packed_model: tuple[Path, Path], synth_manifest: Path,
                                                   tmp_path: Path) -> None:
    model, pack = packed_model
    manifest = _metrics(["-m", str(model), "--data", str(synth_manifest), "--split", "test"], tmp_path / "m.json")
    assert manifest["accuracy"] > 0.5
    assert _metrics(["-m", str(model), "--pack", str(pack)], tmp_path / "p.json") == manifest
    # The same pack as URLs WebDataset opens, streamed shard by shard (test: two shards).
    assert _metrics(["-m", str(model), "--pack", f"file://{pack}"], tmp_path / "f.json") == manifest
    piped = CliRunner().invoke(app, ["evaluate", "-m", str(model), "--pack", f"pipe:cat {pack}/{{}}"])
    assert piped.exit_code == 1 and "pipe: commands are not run" in " ".join(piped.output.split())
    val = _metrics(["-m", str(model), "--pack", str(pack), "--split", "val"], tmp_path / "v.json")
    assert val == _metrics(["-m", str(model), "--data", str(synth_manifest), "--split", "val"], tmp_path / "w.json")


def test_a_url_pack_is_streamed_and_a_missing_shard_is_named(packed_model: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    model_dir, pack = packed_model
    model = MultimodalModel.from_pretrained(model_dir)
    split = pack_split_for_model(model, f"file://{pack}", "test")
    assert isinstance(split, StreamedSplit) and len(split) == 16
    assert [s.id for s in split] == [s.id for s in pack_split_for_model(model, pack, "test").samples]
    broken = tmp_path / "broken"
    shutil.copytree(pack, broken)
    (broken / "test-00001.tar").unlink()
    with pytest.raises(DataError, match=r"test-00001\.tar"):
        list(pack_split_for_model(model, f"file://{broken}", "test"))
    with pytest.raises(DataError, match=r"has no split 'holdout'; it has test, train, val"):
        pack_split_for_model(model, pack, "holdout")


def test_a_pack_of_other_preprocessing_is_refused(packed_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, pack = packed_model
    other = tmp_path / "other"
    shutil.copytree(pack, other)
    state = json.loads((other / "pack.json").read_text())
    state["preprocessor"]["image"]["size"] = 8
    (other / "pack.json").write_text(json.dumps(state))
    result = CliRunner().invoke(app, ["evaluate", "-m", str(model), "--pack", str(other)])
    assert result.exit_code != 0
    assert "preprocessed differently from the model (its image differ)" in " ".join(result.output.split())
    both = CliRunner().invoke(app, ["evaluate", "-m", str(model), "--pack", str(pack), "--robustness"])
    assert both.exit_code != 0 and "--robustness needs the raw data" in " ".join(both.output.split())


def test_url_forms() -> None:
    assert member_url("s3://bucket/packs/a/", "pack.json") == "s3://bucket/packs/a/pack.json"
    assert member_url("https://host/p", "train-00000.tar") == "https://host/p/train-00000.tar"
    with pytest.raises(ConfigError, match=r"pipe: commands are not run .* give the pack's URL instead"):
        member_url("pipe:gsutil cat gs://b/p/{}", "pack.json")
    with pytest.raises(ConfigError, match=r"'zip://' is not a protocol a pack is read from; use one of file://, s3://"):
        member_url("zip://x::file:///tmp/a.zip", "pack.json")
    assert is_url("file:///x") and is_url("pipe:cat x") and not is_url("/data/pack") and not is_url("C:\\pack")


def test_data_pack_takes_urls_of_allowed_protocols_only(synth_manifest: Path) -> None:
    def pack(location: str) -> object:
        return validate_config({"data": {"manifest": str(synth_manifest), "pack": location},
                                "encoders": {"text": {"name": "text_gru"}}}).data.pack

    assert pack("s3://bucket/pack") == "s3://bucket/pack"  # a URL stays a URL (it became 's3:/bucket/pack')
    assert pack("~/packs/a") == str(Path("~/packs/a").expanduser())
    with pytest.raises(ConfigError, match=r"pipe: commands are not run"):
        pack("pipe:aws s3 cp s3://b/p -")
    with pytest.raises(ConfigError, match=r"'ftp://' is not a protocol a pack is read from"):
        pack("ftp://host/pack")
