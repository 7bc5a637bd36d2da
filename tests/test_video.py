"""The video modality: PyAV decoding, a video's audio track, data.on_error, the video_frames encoder,
every fusion on video tokens, the feature cache, the in-memory and pack paths, and fused training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import av  # noqa: F401  (PyAV, of the video extra: a broken install fails here)
import numpy as np
import pytest
import soundfile as sf
import torch
from config_helpers import fusion_section

from mmfuse.config import AudioPrep, ExperimentConfig, ImagePrep, ModalitySpec, TextPrep, VideoPrep, validate_config
from mmfuse.core.contracts import EncoderContext
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.core.registry import ENCODERS, FUSIONS
from mmfuse.data.audio import CropTally, load_waveform, log_mel
from mmfuse.data.dataset import CACHED_POOLED, Collator, MultimodalDataset
from mmfuse.data.preprocess import Preprocessor
from mmfuse.data.video import load_video, load_video_waveform
from mmfuse.datasets.synth_video import generate_synthetic_video, write_video
from mmfuse.engine.data import PreparedData, prepare_data
from mmfuse.engine.feature_cache import cache_datasets
from mmfuse.model import MultimodalModel

SPECS = {"video": {"kind": "video", "column": "video"},
         "audio": {"kind": "audio", "column": "video", "from_video": True},
         "text": {"kind": "text", "column": "caption"}}
ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "video": {"name": "video_frames", "frame_features": "flatten", "dim": 32, "temporal": "transformer", "heads": 4,
              "frame_options": {"dim": 8, "channels": [8, 8]}},
    "audio": {"name": "audio_cnn", "dim": 32, "channels": [8, 16]},
    "text": {"name": "text_gru", "dim": 32},
}


def ramp(frames: int, size: int = 32) -> np.ndarray:
    """(frames, size, size, 3) uint8 grey frames, frame t at level 16 t: each frame is recognisable by its value
    (lossy coding and limited-range YUV move a level by a few units, far less than the 16 between frames)."""
    return np.broadcast_to((np.arange(frames, dtype=np.uint8) * 16)[:, None, None, None],
                           (frames, size, size, 3)).copy()


def tone(seconds: float, rate: int, hz: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def video_config(manifest: Path, out: Path, modalities: tuple[str, ...] = ("video", "audio", "text"),
                 fusion: str = "concat", fusion_options: dict[str, Any] | None = None, lr: float = 0.005,
                 trainer: dict[str, Any] | None = None, **data: Any) -> ExperimentConfig:
    raw: dict[str, Any] = {
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 32, "modalities": {m: SPECS[m] for m in modalities},
                 "video": {"frames": 8, "size": 32}, "text": {"max_length": 8},
                 "audio": {"sample_rate": 8000, "n_mels": 32, "n_fft": 256, "hop_length": 128}, **data},
        "encoders": {m: ENCODER_CONFIGS[m] for m in modalities},
        "fusion": fusion_section(fusion, out_dim=32, **(fusion_options or {})),
        "optim": {"lr": lr},
        "trainer": {"max_epochs": 15, "patience": None, "output_dir": str(out), "progress_bar": False, "threads": 1,
                    **(trainer or {})},
    }
    return validate_config(raw)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic videos (19 train, 2 val, 3 test)."""
    return generate_synthetic_video(tmp_path_factory.mktemp("video24"), n_samples=24, seed=1)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 synthetic videos: enough for every factor to be learned in a few epochs."""
    return generate_synthetic_video(tmp_path_factory.mktemp("video240"), n_samples=240, seed=0)


# ---- decoding ----------------------------------------------------------------------------------------


def test_frames_are_sampled_uniformly_or_at_fps_and_resized_like_images(tmp_path: Path) -> None:
    path = tmp_path / "ramp.mp4"
    write_video(path, ramp(16), tone(1.0, 8000, 440.0), fps=16)
    plain = {"mean": 0.0, "std": 1.0}
    uniform = load_video(path, VideoPrep(frames=4, size=16, **plain))
    assert uniform.shape == (4, 3, 16, 16) and uniform.dtype == torch.float32
    # The middles of 4 equal segments of 16 frames: frames 2, 6, 10, 14 (levels 32, 96, 160, 224).
    levels = uniform.mean(dim=(1, 2, 3)) * 255
    assert torch.allclose(levels, torch.tensor([32.0, 96.0, 160.0, 224.0]), atol=6.0), levels
    # fps 4 over a 1 s clip: t = 0, 0.25, 0.5, 0.75 -> frames 0, 4, 8, 12; fewer than `frames` is fine.
    at_fps = load_video(path, VideoPrep(frames=8, fps=4.0, size=16, **plain))
    assert at_fps.shape == (4, 3, 16, 16)
    assert torch.allclose(at_fps.mean(dim=(1, 2, 3)) * 255, torch.tensor([0.0, 64.0, 128.0, 192.0]), atol=6.0)
    # Image conventions: grayscale, another size, the default (x - 0.5) / 0.5 normalisation.
    grey = load_video(path, VideoPrep(frames=2, size=8, mode="grayscale"))
    assert grey.shape == (2, 1, 8, 8) and grey.min() >= -1.0 and grey.max() <= 1.0
    # A clip shorter than `frames` repeats frames: always exactly `frames`.
    assert load_video(path, VideoPrep(frames=20, size=8)).shape == (20, 3, 8, 8)
    # max_seconds decodes only the start: the first half of the clip, uniformly.
    half = load_video(path, VideoPrep(frames=2, size=8, max_seconds=0.5, **plain))
    assert torch.allclose(half.mean(dim=(1, 2, 3)) * 255, torch.tensor([32.0, 96.0]), atol=6.0)


def test_fps_clips_shorter_than_frames_are_padded_and_masked(tmp_path: Path) -> None:
    from mmfuse.data.dataset import Sample
    from mmfuse.data.memory import ArrayDataset, from_dataset

    write_video(tmp_path / "one.mp4", ramp(16), None, fps=16)  # 1 s: fps 4 gives 4 frames
    write_video(tmp_path / "half.mp4", ramp(8), None, fps=16)  # 0.5 s: 2 frames
    pre = Preprocessor({"clip": ModalitySpec(kind="video", column="video")}, TextPrep(), ImagePrep(), AudioPrep(),
                       video=VideoPrep(frames=6, fps=4.0, size=8))
    samples = [Sample(name, {"clip": pre.encode("clip", str(tmp_path / f"{name}.mp4"))}) for name in ("one", "half")]
    samples.append(Sample("none", {"clip": None}))
    batch = Collator(pre, None)(samples)
    assert batch.inputs["clip"]["pixels"].shape == (3, 6, 3, 8, 8)
    assert batch.inputs["clip"]["frame_mask"].sum(dim=1).tolist() == [4, 2, 0]
    assert batch.present["clip"].tolist() == [True, True, False]
    assert not batch.inputs["clip"]["pixels"][0, 4:].any() and not batch.inputs["clip"]["pixels"][2].any()
    # The in-memory path trims the padding back off a sample.
    dataset = MultimodalDataset([], pre, None)
    dataset.samples = samples
    arrays = from_dataset(dataset, Collator(pre, None))
    assert isinstance(arrays, ArrayDataset)
    assert arrays[1].inputs["clip"]["pixels"].shape == (2, 3, 8, 8)  # type: ignore[index]
    assert torch.equal(arrays[1].inputs["clip"]["pixels"], samples[1].inputs["clip"]["pixels"])  # type: ignore[index]


def test_the_audio_track_is_featurised_exactly_like_a_wav_file(tmp_path: Path) -> None:
    wave = tone(1.0, 8000, 440.0)
    write_video(tmp_path / "clip.mp4", ramp(8), wave, fps=8)
    pcm = np.clip(np.rint(wave * 32767), -32768, 32767).astype(np.int16)  # what the MP4's PCM track holds
    sf.write(tmp_path / "clip.wav", pcm, 8000, subtype="PCM_16")
    prep = AudioPrep(sample_rate=16000, max_seconds=1.0, n_mels=32, n_fft=512, hop_length=256)
    from_video = load_video_waveform(tmp_path / "clip.mp4", prep)
    from_wav = load_waveform(tmp_path / "clip.wav", prep)
    assert from_video.shape == (16000,) and from_video.dtype == np.float32  # resampled 8 kHz -> 16 kHz, 1 s
    np.testing.assert_allclose(from_video, from_wav, atol=1e-6)
    spectrum = np.abs(np.fft.rfft(from_video))
    assert abs(np.argmax(spectrum) * 16000 / len(from_video) - 440.0) <= 2.0
    crops = CropTally()
    cropped = load_video_waveform(tmp_path / "clip.mp4", AudioPrep(sample_rate=8000, max_seconds=0.5), crops)
    assert cropped.shape == (4000,) and crops.count == 1 and crops.longest_seconds == pytest.approx(1.0)
    # Through the preprocessor: an audio modality with from_video gives the WAV's log-mel.
    pre = Preprocessor({"sound": ModalitySpec(kind="audio", column="video", from_video=True)}, TextPrep(),
                       ImagePrep(), prep)
    encoded = pre.encode("sound", str(tmp_path / "clip.mp4"))
    assert encoded is not None
    torch.testing.assert_close(encoded["mel"], log_mel(from_wav, prep))


def broken_videos(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.mp4" for name in ("corrupt", "empty", "frameless", "silent")}
    paths["corrupt"].write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 8)
    paths["empty"].write_bytes(b"")  # zero-length file
    write_video(paths["frameless"], np.zeros((0, 32, 32, 3), dtype=np.uint8), tone(0.1, 8000, 440.0))
    write_video(paths["silent"], ramp(8), None, fps=8)
    return paths


def test_corrupt_empty_and_silent_videos_give_errors_naming_the_file(tmp_path: Path) -> None:
    paths = broken_videos(tmp_path)
    prep = VideoPrep(frames=4)
    with pytest.raises(DataError, match=r"cannot decode video .*corrupt\.mp4"):
        load_video(paths["corrupt"], prep)
    with pytest.raises(DataError, match=r"empty\.mp4 is empty \(0 bytes\)"):
        load_video(paths["empty"], prep)
    with pytest.raises(DataError, match=r"frameless\.mp4 has no video stream"):
        load_video(paths["frameless"], prep)
    with pytest.raises(DataError, match=r"silent\.mp4 has no audio track"):
        load_video_waveform(paths["silent"], AudioPrep())
    assert load_video(paths["silent"], prep).shape == (4, 3, 32, 32)  # its frames are fine
    with pytest.raises(DataError, match=r"video file not found: .*missing\.mp4"):
        load_video(tmp_path / "missing.mp4", prep)


def test_broken_videos_follow_on_error(small_set: Path, tmp_path: Path) -> None:
    """raise: the first bad row, named with its file; skip: each bad sample counted with its reason."""
    paths = broken_videos(tmp_path / "broken")
    rows = [json.loads(line) for line in small_set.read_text().splitlines()]
    for row in rows:
        row["video"] = str(small_set.parent / row["video"])
    for i, name in zip((3, 5, 7), ("corrupt", "empty", "silent"), strict=True):  # train rows
        rows[i]["video"] = str(paths[name])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first_bad = r"manifest\.jsonl row 4 \(id v00003\): cannot decode (the audio track of )?video .*corrupt\.mp4"
    with pytest.raises(DataError, match=first_bad):
        prepare_data(video_config(manifest, tmp_path / "run", ("video", "audio")))
    skipping = prepare_data(video_config(manifest, tmp_path / "run", ("video", "audio"), on_error="skip"))
    report = skipping.datasets["train"].report
    assert report.count == 3 and len(skipping.datasets["train"]) == 19 - 3
    reasons = {row["id"]: row["reason"] for row in report.rows}
    assert "corrupt.mp4" in reasons["v00003"] and "empty.mp4 is empty" in reasons["v00005"]
    assert "has no audio track" in reasons["v00007"]
    # Without an audio modality, the silent video is a good sample.
    frames_only = prepare_data(video_config(manifest, tmp_path / "run", ("video",), on_error="skip"))
    assert frames_only.datasets["train"].report.count == 2


# ---- the encoder --------------------------------------------------------------------------------------


def video_encoder(temporal: str, frame_features: str = "flatten", seed: int = 0) -> Any:
    torch.manual_seed(seed)
    context = EncoderContext(kind="video", channels=3, image_size=16, max_length=5)
    return ENCODERS.create("video_frames", context=context, temporal=temporal, dim=16, heads=4,
                           frame_features=frame_features, frame_options={"dim": 8, "channels": [8]}).eval()


def clips() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Three clips: 5 real frames, 2 real frames (3 padding), absent."""
    pixels = torch.randn(3, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    return {"pixels": pixels * mask[:, :, None, None, None], "frame_mask": mask}, torch.tensor([True, True, False])


def test_video_frames_shapes_mask_padding_and_gradients() -> None:
    encoder = video_encoder("transformer")
    inputs, present = clips()
    seen: list[int] = []
    encoder.frame_encoder.register_forward_hook(lambda _m, args, _o: seen.append(args[0]["pixels"].shape[0]))
    f = encoder(inputs, present)
    assert seen == [7]  # only the 5 + 2 real frames of present clips ran through the image encoder
    assert f.tokens.shape == (3, 5, 16) and f.pooled.shape == (3, 16) and f.mask.shape == (3, 5)
    assert torch.equal(f.mask, inputs["frame_mask"]) and torch.equal(f.present, present)
    assert not f.tokens[2].any() and not f.pooled[2].any()
    # Padding frames and absent clips are never read: garbage there (NaN included) changes nothing.
    noisy = {k: v.clone() for k, v in inputs.items()}
    noisy["pixels"][1, 2:] = float("nan")
    noisy["pixels"][2] = torch.randn(5, 3, 16, 16)
    g = encoder(noisy, present)
    torch.testing.assert_close(g.pooled, f.pooled)
    torch.testing.assert_close(g.tokens[f.mask], f.tokens[f.mask])
    # Gradients reach the frame encoder, the frame projection and the temporal model.
    encoder.train()
    encoder(inputs, present).pooled.sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_order_matters_to_the_transformer_not_to_mean_pooling() -> None:
    inputs, present = clips()
    reversed_inputs = {"pixels": inputs["pixels"].flip(1), "frame_mask": inputs["frame_mask"]}  # row 0: all real
    with torch.no_grad():
        mean = video_encoder("mean", "pooled")
        torch.testing.assert_close(mean(reversed_inputs, present).pooled[0], mean(inputs, present).pooled[0])
        temporal = video_encoder("transformer")
        assert not torch.allclose(temporal(reversed_inputs, present).pooled[0], temporal(inputs, present).pooled[0],
                                  atol=1e-4)


# ---- fusion, cache, in-memory and pack paths ---------------------------------------------------------


@pytest.fixture(scope="module")
def missing_video(small_set: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """video + caption, 16 rows, train sample v00000 without its video."""
    rows = [json.loads(line) for line in small_set.read_text().splitlines()][:16]
    for row in rows:
        row["video"] = str(small_set.parent / row["video"])
        row["split"] = "train"
    rows[0]["video"] = None
    manifest = tmp_path_factory.mktemp("missing") / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = video_config(manifest, tmp_path_factory.mktemp("run"), ("video", "text"), val_fraction=0.25)
    return prepare_data(config)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_every_fusion_reads_video_tokens_with_a_missing_video(fusion: str, missing_video: PreparedData,
                                                              one_thread: None) -> None:
    config = validate_config({"data": {"train": "unused.jsonl", "modalities": {m: SPECS[m] for m in ("video", "text")}},
                              "encoders": {m: ENCODER_CONFIGS[m] for m in ("video", "text")},
                              "fusion": fusion_section(fusion, out_dim=16)})
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, missing_video.preprocessor, missing_video.task)
    samples = [s for s in missing_video.datasets["train"].samples[:6]]
    batch = Collator(missing_video.preprocessor, missing_video.task)(samples)
    absent = batch.ids.index("v00000")
    assert not batch.present["video"][absent] and int(batch.present["video"].sum()) == len(samples) - 1
    assert batch.inputs["video"]["pixels"].shape == (6, 8, 3, 32, 32)
    model.train()
    logits = model(batch)
    assert logits.shape == (6, 8) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, batch.target).backward()
    grads = [p.grad for p in model.encoders["video"].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # The absent video's pixels are never read: NaN there leaves every output as it was.
    model.eval()
    with torch.no_grad():
        clean = model(batch)
        batch.inputs["video"]["pixels"][absent] = float("nan")
        torch.testing.assert_close(model(batch), clean)


@pytest.mark.parametrize("frame", ["image_cnn", "timm_image"])
def test_feature_cache_stores_a_frozen_frame_encoder(frame: str, small_set: Path, tmp_path: Path,
                                                     one_thread: None) -> None:
    if frame == "timm_image":
        encoder = {"name": "video_frames", "frame_encoder": "timm_image",
                   "frame_options": {"model": "test_efficientnet", "trainable": "frozen"}}  # temporal: mean
    else:
        encoder = {**ENCODER_CONFIGS["video"], "freeze": True}
    raw = {"data": {"manifest": str(small_set), "modalities": {"video": SPECS["video"]}, "cache": True,
                    "cache_dir": str(tmp_path / "cache"), "video": {"frames": 4, "size": 32}},
           "encoders": {"video": encoder}, "fusion": {"name": "mult", "out_dim": 16},
           "trainer": {"output_dir": str(tmp_path / "run")}}
    config = validate_config(raw)
    data = prepare_data(config)
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task).eval()
    _, stats = cache_datasets(model, data.datasets, tmp_path / "cache", device="cpu")
    assert stats.computed == {"video": 24} and stats.hits == {"video": 0}
    again, stats = cache_datasets(model, data.datasets, tmp_path / "cache", device="cpu")
    assert stats.computed == {"video": 0} and stats.hits == {"video": 24}
    collate = Collator(data.preprocessor, data.task)
    raw_batch = collate(data.datasets["train"].samples[:8])
    hit_batch = collate(again["train"].samples[:8])
    assert CACHED_POOLED in hit_batch.inputs["video"]
    with torch.no_grad():
        direct, cached = model.encode(raw_batch)["video"], model.encode(hit_batch)["video"]
        torch.testing.assert_close(cached.pooled, direct.pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.tokens, direct.tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(hit_batch), model(raw_batch), atol=1e-5, rtol=1e-5)


def test_hf_image_frame_encoder_takes_its_processor_caches_and_reloads(small_set: Path, tmp_path: Path,
                                                                       one_thread: None) -> None:
    """A (tiny, random) ViT per frame: data.video.processor sets size/mean/std, the frozen encoder is cached,
    and a saved model rebuilds the ViT from its own folder (the frame encoder's assets)."""
    import transformers
    vit = tmp_path / "vit"
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)).save_pretrained(str(vit))
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(str(vit))
    raw = {"data": {"manifest": str(small_set), "modalities": {"video": SPECS["video"]}, "cache": True,
                    "cache_dir": str(tmp_path / "cache"), "video": {"frames": 4, "processor": str(vit)}},
           "encoders": {"video": {"name": "video_frames", "frame_encoder": "hf_image",
                                  "frame_options": {"model": str(vit)}}},
           "fusion": {"name": "concat", "out_dim": 8}, "trainer": {"output_dir": str(tmp_path / "run")}}
    config = validate_config(raw)
    data = prepare_data(config)
    assert data.preprocessor.video.size == 16 and data.preprocessor.video.mean == pytest.approx((0.4, 0.5, 0.6))
    model = MultimodalModel.from_config(config, data.preprocessor, data.task).eval()
    _, stats = cache_datasets(model, data.datasets, tmp_path / "cache", device="cpu")
    assert stats.computed == {"video": 24}
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "encoders" / "video" / "config.json").is_file()
    reloaded = MultimodalModel.from_pretrained(tmp_path / "model")
    assert reloaded.preprocessor.video == data.preprocessor.video
    batch = Collator(reloaded.preprocessor, reloaded.task)(data.datasets["train"].samples[:4])
    with torch.no_grad():
        assert torch.equal(model(batch), reloaded(batch))


def test_in_memory_and_pack_paths_hold_the_same_video_tensors(small_set: Path, tmp_path: Path) -> None:
    from mmfuse.data.memory import ArrayDataset
    from mmfuse.engine.pack import pack_data

    plain = video_config(small_set, tmp_path / "run", ("video", "audio"), video={"frames": 4, "size": 16})
    reference = prepare_data(plain)
    in_memory = prepare_data(video_config(small_set, tmp_path / "run", ("video", "audio"),
                                          video={"frames": 4, "size": 16}, in_memory=True,
                                          in_memory_cache=str(tmp_path / "arrays")))
    arrays = in_memory.datasets["train"]
    assert isinstance(arrays, ArrayDataset)
    batch = arrays.batch(torch.arange(5))
    assert batch.inputs["video"]["pixels"].shape == (5, 4, 3, 16, 16) and batch.inputs["video"]["frame_mask"].all()
    pack_data(plain, tmp_path / "pack", workers=1, shard_size=8)
    packed = prepare_data(plain.model_copy(update={"data": plain.data.model_copy(update={"pack": tmp_path / "pack"})}))
    # data.video is part of the pack's fingerprint: other frame settings do not read this pack.
    two_frames = plain.data.model_copy(update={"pack": tmp_path / "pack", "video": VideoPrep(frames=2, size=16)})
    with pytest.raises(DataError, match=r"does not match the config: data\.video: .*'frames': 4.* in the pack, "
                                        r".*'frames': 2"):
        prepare_data(plain.model_copy(update={"data": two_frames}))
    for other in (arrays, packed.datasets["train"]):
        for i in (0, 7, len(other) - 1):
            ours, theirs = other[i], reference.datasets["train"][i]
            assert ours.id == theirs.id
            for m in ("video", "audio"):
                for name, tensor in theirs.inputs[m].items():  # type: ignore[union-attr]
                    assert torch.equal(ours.inputs[m][name], tensor), (type(other).__name__, i, m, name)  # type: ignore[index]


# ---- data set, CLI, config ---------------------------------------------------------------------------


def test_synthetic_video_set_is_deterministic_balanced_and_written_by_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmfuse.cli import app

    first = generate_synthetic_video(tmp_path / "a", n_samples=16, seed=3)
    result = CliRunner().invoke(app, ["data", "synth-video", "--out", str(tmp_path / "b"), "--n", "16", "--seed", "3"])
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 17
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    counts = Counter(r["label"] for r in rows)
    assert len(counts) == 8 and set(counts.values()) == {2}  # 8 classes, 2 each
    assert all(r["label"] == f"{r['direction']}-{r['pitch']}-{r['mood']}" for r in rows)
    clip = load_video(first.parent / rows[0]["video"], VideoPrep(frames=16))
    assert clip.shape == (16, 3, 32, 32)
    assert load_video_waveform(first.parent / rows[0]["video"], AudioPrep(sample_rate=8000)).shape == (8000,)


def test_video_config_errors_name_the_key() -> None:
    base = {"data": {"train": "t.jsonl", "modalities": {"clip": {"kind": "video", "column": "video",
                                                                 "from_video": True}}},
            "encoders": {"clip": {"name": "video_frames"}}}
    with pytest.raises(ConfigError, match=r"data\.modalities\.clip: from_video reads a video's audio track: it needs "
                       r"kind 'audio'"):
        validate_config(base)
    with pytest.raises(ConfigError, match=r"unknown key 'frame'.*did you mean 'frames'"):
        validate_config({"data": {"train": "t.jsonl", "video": {"frame": 4}},
                         "encoders": {"video": {"name": "video_frames"}}})
    config = validate_config({"data": {"train": "t.jsonl"}, "encoders": {"video": {"name": "video_frames"}}})
    assert config.data.modalities["video"].kind == "video" and config.data.modalities["video"].column == "video"


# ---- training -----------------------------------------------------------------------------------------


def fast_config(manifest: Path, out: Path, modalities: tuple[str, ...], fusion: str) -> ExperimentConfig:
    """4 frames of 16 x 16 (enough to see the direction), 20 epochs at most, stopping at 95% val accuracy.

    mult (cross-modal attention) trains slower: narrower, a smaller learning rate and more epochs, as in
    benchmarks/video_synth.py.
    """
    mult = fusion == "mult"
    return video_config(manifest, out, modalities, fusion, video={"frames": 4, "size": 16},
                        fusion_options={"dim": 32, "hidden": 64} if mult else {}, lr=0.002 if mult else 0.005,
                        trainer={"max_epochs": 30 if mult else 20, "stop_at": 0.95})


def test_fused_video_audio_text_beats_the_ceiling_of_any_single_modality(train_set: Path, tmp_path: Path) -> None:
    """Each modality carries one of three independent binary factors of the 8 balanced classes, so no single
    modality can exceed 25% accuracy; concat fusion over the video frames, its soundtrack and the caption must
    get well past that (the slow test below trains every single modality too). The saved model reloads."""
    from mmfuse.engine.fit import fit

    config = fast_config(train_set, tmp_path / "fused", ("video", "audio", "text"), "concat")
    data = prepare_data(config)
    result = fit(config, data)
    assert result.test_metrics is not None
    assert result.val_metrics["accuracy"] >= 0.5 and result.test_metrics["accuracy"] >= 0.5, result.test_metrics
    reloaded = MultimodalModel.from_pretrained(tmp_path / "fused" / "model")
    batch = Collator(reloaded.preprocessor, reloaded.task)(data.datasets["test"].samples[:6])
    with torch.no_grad():
        assert torch.equal(result.model.eval()(batch), reloaded(batch))


@pytest.mark.slow
def test_fused_beats_each_single_modality(train_set: Path, tmp_path: Path) -> None:
    from mmfuse.engine.fit import fit

    accuracy: dict[str, float] = {}
    for name, modalities, fusion in (("video", ("video",), "concat"), ("audio", ("audio",), "concat"),
                                     ("text", ("text",), "concat"), ("concat", ("video", "audio", "text"), "concat"),
                                     ("mult", ("video", "audio", "text"), "mult")):
        config = fast_config(train_set, tmp_path / name, modalities, fusion)
        result = fit(config, prepare_data(config))
        assert result.test_metrics is not None
        accuracy[name] = (result.val_metrics["accuracy"] + result.test_metrics["accuracy"]) / 2
    best_single = max(accuracy[m] for m in ("video", "audio", "text"))
    assert accuracy["concat"] > best_single + 0.2 and accuracy["mult"] > best_single, accuracy
