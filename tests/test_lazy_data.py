"""``data.mode: lazy``: samples decoded per read in loader workers, equal to the eager path; bad samples
raised or skipped from the workers; nothing decoded held in memory; fitting decodes no image or clip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_pack import pack_config

from mmfuse.config import validate_config
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data import preprocess as preprocess_module
from mmfuse.data.lazy import BadSample, LazyDataset
from mmfuse.engine.data import prepare_data
from mmfuse.engine.evaluate import evaluate
from mmfuse.engine.fit import fit


@pytest.fixture
def own_data(synth_manifest: Path, tmp_path: Path) -> Path:
    shutil.copytree(synth_manifest.parent, tmp_path / "data")
    return tmp_path / "data" / synth_manifest.name


def _tensors(value: object) -> list[torch.Tensor]:
    """Every tensor reachable from ``value`` through attributes, dicts and lists (not into modules' code)."""
    found, seen, todo = [], set(), [value]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            todo += list(item.values())
        elif isinstance(item, list | tuple | set):
            todo += list(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            todo += list(vars(item).values())
    return found


def test_lazy_trains_to_the_eager_model_and_metrics(synth_manifest: Path, tmp_path: Path, one_thread: None) -> None:
    eager = pack_config(synth_manifest, tmp_path / "eager")
    lazy = pack_config(synth_manifest, tmp_path / "lazy", mode="lazy", num_workers=2)
    eager_data, lazy_data = prepare_data(eager), prepare_data(lazy)
    assert all(isinstance(d, LazyDataset) for d in lazy_data.datasets.values())
    assert lazy_data.preprocessor.state() == eager_data.preprocessor.state()
    for split in ("train", "val", "test"):  # the same preprocessing functions: the same tensors
        ours, theirs = lazy_data.datasets[split], eager_data.datasets[split]
        assert len(ours) == len(theirs)
        for i in (0, 5, len(ours) - 1):
            a, b = ours[i], theirs[i]
            assert isinstance(a, type(b)) and a.id == b.id and torch.equal(a.target, b.target)  # type: ignore
            for m, inputs in b.inputs.items():
                for name, tensor in (inputs or {}).items():
                    assert torch.equal(a.inputs[m][name], tensor), (split, i, m, name)  # type: ignore[index]
    from_lazy, from_eager = fit(lazy, lazy_data), fit(eager, eager_data)
    assert from_lazy.test_metrics == from_eager.test_metrics and from_lazy.val_metrics == from_eager.val_metrics
    assert from_eager.test_metrics is not None and from_eager.test_metrics["accuracy"] > 0.5  # it learned
    for (name, p), q in zip(from_lazy.model.state_dict().items(), from_eager.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert evaluate(from_lazy.model, lazy_data.datasets["test"]) == from_eager.test_metrics


def test_a_lazy_split_holds_no_decoded_tensors(synth_manifest: Path, tmp_path: Path) -> None:
    data = prepare_data(pack_config(synth_manifest, tmp_path / "run", mode="lazy"))
    train = data.datasets["train"]
    samples = [train[i] for i in range(10)]  # read (decoded) some samples
    assert all(not isinstance(s, BadSample) and s.inputs["image"] is not None for s in samples)  # type: ignore
    assert _tensors(train) == []  # records, settings and vocabulary only
    eager = prepare_data(pack_config(synth_manifest, tmp_path / "eager"))
    assert len(_tensors(eager.datasets["train"])) >= 3 * len(eager.datasets["train"])  # what lazy avoids


def test_lazy_fitting_decodes_no_image_or_audio(synth_manifest: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded while fitting")

    monkeypatch.setattr(preprocess_module, "decode_image", refuse)
    monkeypatch.setattr(preprocess_module, "load_waveform", refuse)
    data = prepare_data(pack_config(synth_manifest, tmp_path / "run", mode="lazy"))
    assert data.preprocessor.tokenizers["text"].vocab_size > 10 and data.task.state()["labels"] == ["high", "low"]
    with pytest.raises(AssertionError, match="decoded while fitting"):  # reading a sample does decode
        data.datasets["train"][0]


def test_a_bad_lazy_sample_raises_naming_the_row_or_is_skipped_once(own_data: Path, tmp_path: Path,
                                                                    one_thread: None) -> None:
    rows = [json.loads(line) for line in own_data.read_text().splitlines()]
    bad = next(r for r in rows if r["split"] == "train")
    (own_data.parent / bad["image"]).write_bytes(b"not a png")
    # From a worker process, the error reaches the user as one line naming file, row and id.
    config = pack_config(own_data, tmp_path / "raise", mode="lazy", num_workers=2)
    config.trainer.max_epochs = 1
    with pytest.raises(DataError) as caught:
        fit(config, prepare_data(config))
    assert str(caught.value).startswith(f"manifest.jsonl row {rows.index(bad) + 1} (id {bad['id']}): cannot decode "
                                        f"image {own_data.parent / bad['image']}")
    assert "Traceback" not in str(caught.value)
    # skip: left out, counted once over two epochs, and listed in skipped.jsonl as eagerly.
    skip = pack_config(own_data, tmp_path / "skip", mode="lazy", num_workers=2, on_error="skip")
    skip.trainer.max_epochs = 2
    result = fit(skip, prepare_data(skip))
    assert result.skipped == {"train": 1}
    eager = pack_config(own_data, tmp_path / "eager", on_error="skip")
    eager.trainer.max_epochs = 1
    eager_result = fit(eager, prepare_data(eager))
    assert result.skipped_file is not None and eager_result.skipped_file is not None
    assert result.skipped_file.read_text() == eager_result.skipped_file.read_text()
    assert bad["id"] in result.skipped_file.read_text()


@pytest.mark.parametrize("other", [{"in_memory": True}, {"pack": "somewhere"}, {"cache": True}])
def test_lazy_excludes_pack_in_memory_and_cache(synth_manifest: Path, other: dict[str, object]) -> None:
    name = next(iter(other))
    with pytest.raises(ConfigError, match=rf"data.mode lazy .* data.{name} .*give one of them"):
        validate_config({"data": {"manifest": str(synth_manifest), "mode": "lazy", **other},
                         "encoders": {"text": {"name": "text_gru"}}})


def test_cropped_clips_are_reported_once_as_eagerly(synth_manifest: Path, tmp_path: Path, one_thread: None,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    audio = {"n_mels": 32, "n_fft": 512, "hop_length": 256, "max_seconds": 0.25}
    eager = pack_config(synth_manifest, tmp_path / "eager", audio=audio)
    with caplog.at_level("WARNING", logger="mmfuse.engine.data"):
        prepare_data(eager)
    eager_lines = [r.getMessage() for r in caplog.records if "cropped" in r.getMessage()]
    assert len(eager_lines) == 1 and eager_lines[0].startswith("160 audio clips were longer")
    caplog.clear()
    lazy = pack_config(synth_manifest, tmp_path / "lazy", audio=audio, mode="lazy", num_workers=2)
    lazy.trainer.max_epochs = 2
    with caplog.at_level("WARNING", logger="mmfuse.engine.data"):
        fit(lazy, prepare_data(lazy))  # two epochs read every clip twice: still counted once
    assert [r.getMessage() for r in caplog.records if "cropped" in r.getMessage()] == eager_lines
