"""``data.augment``: image crop/flip, SpecAugment masks, word dropout; train split only, off by default,
a function of (seed, epoch, sample index), the same in loader workers as in the main process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pack import pack_config

from mmfuse.config import AudioAugment, ImageAugment
from mmfuse.core.errors import ConfigError
from mmfuse.data.augment import AugmentedDataset, augment_image, augment_mel, sample_generator, word_dropout
from mmfuse.data.dataset import Collator, Sample
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit
from mmfuse.engine.loader import ResumableLoader

AUGMENT = {"image": {"flip": 0.5, "crop_scale": [0.6, 1.0]},
           "audio": {"time_masks": 2, "time_width": 6, "freq_masks": 2, "freq_width": 4},
           "text": {"word_dropout": 0.3}}


def _sample(dataset: object, key: object) -> Sample:
    item = dataset[key]  # type: ignore[index]
    assert isinstance(item, Sample)
    return item


def _equal(a: Sample, b: Sample) -> dict[str, bool]:
    return {m: all(torch.equal(a.inputs[m][k], v) for k, v in (b.inputs[m] or {}).items())  # type: ignore[index]
            for m in b.inputs}


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_augmentation_changes_train_samples_only(synth_manifest: Path, tmp_path: Path, mode: str,
                                                one_thread: None) -> None:
    plain = prepare_data(pack_config(synth_manifest, tmp_path / "plain", mode=mode))
    augmented = prepare_data(pack_config(synth_manifest, tmp_path / "aug", mode=mode, augment=AUGMENT))
    train = augmented.datasets["train"]
    assert isinstance(train, AugmentedDataset) and not isinstance(plain.datasets["train"], AugmentedDataset)
    changed = {"image": 0, "audio": 0, "text": 0}
    for i in range(20):
        ours, theirs = _sample(train, (1, i)), _sample(plain.datasets["train"], i)
        for m, same in _equal(ours, theirs).items():
            changed[m] += not same
        for m, inputs in theirs.inputs.items():  # shapes kept (text: at most as long)
            for k, v in (inputs or {}).items():
                got = ours.inputs[m][k]  # type: ignore[index]
                assert got.shape == v.shape if m != "text" else got.shape[0] <= v.shape[0], (m, k)
    assert changed["image"] >= 15 and changed["audio"] >= 15 and changed["text"] >= 10, changed
    for split in ("val", "test"):  # never augmented
        assert not isinstance(augmented.datasets[split], AugmentedDataset)
        for i in range(len(plain.datasets[split])):
            assert all(_equal(_sample(augmented.datasets[split], i), _sample(plain.datasets[split], i)).values())


def test_off_by_default_and_zero_options_change_nothing(synth_manifest: Path, tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run", mode="lazy")
    assert not config.data.augment.active
    off = {"image": {"flip": 0.0}, "text": {"word_dropout": 0}, "audio": {"time_masks": 0, "freq_masks": 0}}
    zeros = pack_config(synth_manifest, tmp_path / "zero", mode="lazy", augment=off)
    assert not zeros.data.augment.active
    a, b = prepare_data(config), prepare_data(zeros)
    assert type(a.datasets["train"]) is type(b.datasets["train"]) and not isinstance(a.datasets["train"],
                                                                                     AugmentedDataset)
    for i in (0, 9):
        assert all(_equal(_sample(b.datasets["train"], i), _sample(a.datasets["train"], i)).values())


def test_draws_are_a_function_of_seed_epoch_and_index(synth_manifest: Path, tmp_path: Path) -> None:
    first = prepare_data(pack_config(synth_manifest, tmp_path / "a", augment=AUGMENT, mode="lazy")).datasets["train"]
    again = prepare_data(pack_config(synth_manifest, tmp_path / "b", augment=AUGMENT, mode="lazy")).datasets["train"]
    other_seed = pack_config(synth_manifest, tmp_path / "c", augment=AUGMENT, mode="lazy")
    other_seed.seed = 1
    reseeded = prepare_data(other_seed).datasets["train"]
    for i in range(5):
        assert all(_equal(_sample(first, (3, i)), _sample(again, (3, i))).values())
        assert not all(_equal(_sample(first, (3, i)), _sample(first, (4, i))).values())
        assert not all(_equal(_sample(first, (3, i)), _sample(reseeded, (3, i))).values())


def test_workers_draw_what_the_main_process_draws_and_epochs_differ(synth_manifest: Path, tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run", augment=AUGMENT, mode="lazy", batch_size=32)
    data = prepare_data(config)
    train, collator = data.datasets["train"], Collator(data.preprocessor, data.task)
    loader = ResumableLoader(train, collator, 32, False, 2, config.seed)  # in order; persistent workers
    batches = []
    try:
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            order = loader.sampler.order()[:32].tolist()
            batch = next(iter(loader))
            expected = collator([_sample(train, (epoch, i)) for i in order])
            assert batch.ids == expected.ids
            for m in expected.inputs:
                for k, v in expected.inputs[m].items():
                    assert torch.equal(batch.inputs[m][k], v), (epoch, m, k)
            batches.append(batch)
        assert batches[0].ids == batches[1].ids  # the same samples, drawn anew in the persistent workers
        assert not torch.equal(batches[0].inputs["image"]["pixels"], batches[1].inputs["image"]["pixels"])
    finally:
        loader.close()


def test_flip_with_probability_one_mirrors_the_image() -> None:
    pixels = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    out = augment_image(pixels, ImageAugment(flip=1.0), sample_generator(0, 0, 0))
    assert torch.equal(out, pixels.flip(-1))
    cropped = augment_image(pixels, ImageAugment(crop_scale=(0.25, 0.5)), sample_generator(0, 0, 1))
    assert cropped.shape == pixels.shape and not torch.equal(cropped, pixels)


def test_spec_masks_have_the_configured_widths() -> None:
    mel = torch.randn(16, 50)
    widths = {"time": set(), "freq": set()}
    for index in range(60):
        out = augment_mel(mel, AudioAugment(time_masks=1, time_width=7), sample_generator(0, 0, index))
        columns = (out != mel).any(dim=0).nonzero().flatten().tolist()
        if columns:  # a width of 0 masks nothing
            assert columns == list(range(columns[0], columns[-1] + 1))  # one contiguous band
            assert torch.all(out[:, columns] == mel.mean())  # filled with the clip's mean
            assert (out != mel).any(dim=1).all()  # a time mask covers every mel bin
        widths["time"].add(len(columns))
        out = augment_mel(mel, AudioAugment(freq_masks=1, freq_width=4), sample_generator(0, 0, index))
        rows = (out != mel).any(dim=1).nonzero().flatten().tolist()
        if rows:
            assert rows == list(range(rows[0], rows[-1] + 1))
            assert torch.all(out[rows] == mel.mean())
            assert (out != mel).any(dim=0).all()  # a frequency mask covers every frame
        widths["freq"].add(len(rows))
    assert max(widths["time"]) == 7 and widths["time"] <= set(range(8)) and len(widths["time"]) >= 5
    assert max(widths["freq"]) == 4 and widths["freq"] <= set(range(5))


def test_word_dropout_keeps_order_and_special_tokens() -> None:
    ids = torch.arange(100, 300)
    kept = [word_dropout(ids, 0.1, frozenset(), sample_generator(0, 0, i)) for i in range(20)]
    rate = 1 - sum(len(k) for k in kept) / (20 * len(ids))
    assert 0.07 < rate < 0.13
    assert all(torch.equal(k, ids[torch.isin(ids, k)]) for k in kept)  # a subsequence, in order
    special = torch.tensor([101, 7, 8, 9, 102])
    for i in range(30):
        out = word_dropout(special, 0.9, frozenset({101, 102}), sample_generator(0, 0, i))
        assert out[0] == 101 and out[-1] == 102 and len(out) >= 3  # specials stay and one word at least


def test_augmented_training_learns(synth_manifest: Path, tmp_path: Path, one_thread: None) -> None:
    config = pack_config(synth_manifest, tmp_path / "run", augment=AUGMENT, mode="lazy")
    result = fit(config, prepare_data(config))
    assert result.test_metrics is not None and result.test_metrics["accuracy"] > 0.6


def test_augment_with_in_memory_or_waveform_is_refused(synth_manifest: Path) -> None:
    from mmfuse.config import validate_config

    base = {"manifest": str(synth_manifest), "augment": AUGMENT}
    with pytest.raises(ConfigError, match=r"data.augment changes every training sample .* data.in_memory"):
        validate_config({"data": {**base, "in_memory": True}, "encoders": {"text": {"name": "text_gru"}}})
    with pytest.raises(ConfigError, match=r"masks the log-mel, but data.audio.features is waveform"):
        validate_config({"data": {**base, "audio": {"features": "waveform"}},
                         "encoders": {"text": {"name": "text_gru"}}})


def test_a_pack_is_augmented_and_augment_is_not_in_its_fingerprint(synth_manifest: Path, tmp_path: Path) -> None:
    from mmfuse.data.pack_dataset import PackDataset
    from mmfuse.engine.pack import pack_data

    plain = pack_config(synth_manifest, tmp_path / "run", pack=str(tmp_path / "pack"))
    pack_data(pack_config(synth_manifest, tmp_path / "run"), tmp_path / "pack", workers=1, shard_size=80)
    augmented = pack_config(synth_manifest, tmp_path / "run", pack=str(tmp_path / "pack"), augment=AUGMENT)
    ours, theirs = prepare_data(augmented), prepare_data(plain)  # the same pack matches both configs
    train = ours.datasets["train"]
    assert isinstance(train, AugmentedDataset) and isinstance(train.base, PackDataset)
    assert not any(all(_equal(_sample(train, (0, i)), _sample(theirs.datasets["train"], i)).values())
                   for i in range(5))
    assert all(_equal(_sample(ours.datasets["val"], 0), _sample(theirs.datasets["val"], 0)).values())


def test_a_resumed_epoch_continues_with_the_same_augmented_batches(synth_manifest: Path, tmp_path: Path,
                                                                   one_thread: None) -> None:
    config = pack_config(synth_manifest, tmp_path / "run", augment=AUGMENT, batch_size=16)  # eager: decoded once
    data = prepare_data(config)
    collator = Collator(data.preprocessor, data.task)
    whole = ResumableLoader(data.datasets["train"], collator, 16, True, 0, config.seed)
    whole.sampler.set_epoch(2)
    uninterrupted = list(whole)
    stopped = ResumableLoader(data.datasets["train"], collator, 16, True, 0, config.seed)
    stopped.sampler.set_epoch(2)
    for _, _ in zip(range(3), stopped, strict=False):
        pass
    resumed = ResumableLoader(data.datasets["train"], collator, 16, True, 0, config.seed)
    resumed.load_state_dict(stopped.state_dict())
    rest = list(resumed)
    assert len(rest) == len(uninterrupted) - 3
    for a, b in zip(rest, uninterrupted[3:], strict=True):
        assert a.ids == b.ids and torch.equal(a.inputs["image"]["pixels"], b.inputs["image"]["pixels"])
        assert torch.equal(a.inputs["audio"]["mel"], b.inputs["audio"]["mel"])
