"""Pretrained encoders (hf_text, hf_image, hf_audio, sentence_transformers, timm_image, ge2e_audio).

Offline: tiny random models are built from configs and saved with ``save_pretrained`` to temp
folders, then loaded through the same code path a user's hub name or folder takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from config_helpers import fusion_section, head_options
from PIL import Image

from mmfuse.config import ExperimentConfig, validate_config
from mmfuse.core.contracts import Batch, EncoderContext
from mmfuse.core.errors import ConfigError, MMFuseError
from mmfuse.data.dataset import Collator, build_sample
from mmfuse.data.manifest import Record
from mmfuse.data.preprocess import Preprocessor
from mmfuse.encoders import ENCODERS
from mmfuse.encoders.pretrained import PretrainedEncoder
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit
from mmfuse.engine.module import parameter_groups
from mmfuse.fusion import FUSIONS
from mmfuse.model import MultimodalModel
from mmfuse.tasks import TASKS

WORDS = ["a", "red", "blue", "green", "square", "circle", "loud", "low", "tone", "the", "here", "quiet"]
TEXTS = ["a red square", "the blue circle", None, "a loud low tone here", "green", "quiet blue tone",
         "red circle here", "the green square"]
LABELS = ["a", "b", "c"]
SR = 16000


# ---- tiny models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random BERT (+tokenizer), ViT (+processor), ResNet and wav2vec2 (+extractor)."""
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizer,
        ResNetConfig,
        ResNetModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    bert = root / "bert"
    bert.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # vocab=, not vocab_file=: in transformers 5 the latter silently maps every word to [UNK].
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(bert))
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(str(bert))
    vit = root / "vit"
    ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(str(vit))
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(str(vit))
    resnet = root / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
                ).save_pretrained(str(resnet))
    w2v = root / "w2v"
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8),
                                 num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                                 feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.0,
                                 layerdrop=0.0)).save_pretrained(str(w2v))
    Wav2Vec2FeatureExtractor(sampling_rate=SR, do_normalize=True, return_attention_mask=True).save_pretrained(str(w2v))
    return {"bert": bert, "vit": vit, "resnet": resnet, "w2v": w2v}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    """Eight samples with real PNG and 16 kHz WAV files; some lack a modality."""
    folder = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        fields: dict[str, str | None] = {"text": TEXTS[i], "image": None, "audio": None}
        if i not in (1, 5):
            Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            fields["image"] = str(folder / f"img{i}.png")
        if i != 3:
            t = np.arange(int(SR * (0.05 + 0.03 * i))) / SR
            wave = 0.5 * np.sin(2 * np.pi * (200 + 100 * i) * t) + 0.01 * rng.standard_normal(t.shape)
            sf.write(folder / f"clip{i}.wav", wave.astype(np.float32), SR)
            fields["audio"] = str(folder / f"clip{i}.wav")
        out.append(Record(source=folder / "manifest.jsonl", row=i + 1, id=f"s{i}", fields=fields,
                          target=LABELS[i % 3]))
    return out


def raw_config(tiny: dict[str, Path], fusion: str = "concat", image: str = "vit", **encoder_options: Any
               ) -> dict[str, Any]:
    image_encoder = {"name": "hf_image", "model": str(tiny[image])}
    return {
        "seed": 0,
        "data": {"synthetic": {"n_samples": 20},
                 "text": {"max_length": 12, "tokenizer": str(tiny["bert"])},
                 "image": {"processor": str(tiny["vit"])} if image == "vit" else {"size": 16},
                 "audio": {"sample_rate": SR, "features": "waveform", "max_seconds": 0.5, "pad_mode": "longest"}},
        "encoders": {"text": {"name": "hf_text", "model": str(tiny["bert"]), **encoder_options},
                     "image": {**image_encoder, **encoder_options},
                     "audio": {"name": "hf_audio", "model": str(tiny["w2v"]), **encoder_options}},
        "fusion": fusion_section(fusion, out_dim=16),
        "task": {"name": "classification", **head_options(fusion, head_hidden=8)},
    }


def build(records: list[Record], config: ExperimentConfig, seed: int = 0) -> tuple[MultimodalModel, Batch]:
    prep = Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio)
    prep.fit(records)
    task = TASKS.create(config.task.name, **config.task.options)
    task.fit([r.target for r in records])
    torch.manual_seed(seed)
    model = MultimodalModel.from_config(config, prep, task)
    batch = Collator(prep, task)([build_sample(r, prep, task) for r in records])
    return model, batch


def train_step(model: MultimodalModel, batch: Batch, lr: float = 1e-2) -> torch.Tensor:
    from mmfuse.config import OptimConfig

    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, OptimConfig(lr=lr)), lr=lr)
    assert batch.target is not None
    loss = model.task.loss(model(batch), batch.target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---- preprocessing ------------------------------------------------------------------------------

def test_pretrained_preprocessing(tiny: dict[str, Path], records: list[Record]) -> None:
    config = validate_config(raw_config(tiny))
    model, batch = build(records, config)
    # WordPiece ids of the model's own vocabulary, with [CLS] (2) ... [SEP] (3); never all [UNK].
    ids = batch.inputs["text"]["input_ids"][0]
    n = int(batch.inputs["text"]["attention_mask"][0].sum())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    assert [vocab[i] for i in ids[:n].tolist()] == ["[CLS]", "a", "red", "square", "[SEP]"]
    assert not batch.present["text"][2]  # None text stays absent
    # The processor's size and per-channel mean/std.
    prep = model.preprocessor
    assert prep.image.size == 16 and prep.image.mean == (0.4, 0.5, 0.6) and prep.image.std == (0.2, 0.25, 0.3)
    image = Image.open(records[0].fields["image"]).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
    expected = (np.asarray(image, dtype=np.float32) / 255 - np.array([0.4, 0.5, 0.6], dtype=np.float32)) / np.array(
        [0.2, 0.25, 0.3], dtype=np.float32)
    assert torch.allclose(batch.inputs["image"]["pixels"][0], torch.from_numpy(expected.transpose(2, 0, 1)), atol=1e-5)
    # Raw waveforms padded to the longest clip, with a sample mask.
    wave, valid = batch.inputs["audio"]["waveform"], batch.inputs["audio"]["sample_mask"]
    lengths = [int(SR * (0.05 + 0.03 * i)) if i != 3 else 0 for i in range(8)]
    assert valid.sum(dim=1).tolist() == lengths and wave.shape[1] == max(lengths)
    data, _ = sf.read(records[0].fields["audio"], dtype="float32")
    assert torch.allclose(wave[0, : lengths[0]], torch.from_numpy(data), atol=1e-6)


def _hf_processor(kind: str) -> Any:
    from transformers import CLIPImageProcessor, ConvNextImageProcessor, DeiTImageProcessor, ViTImageProcessor

    return {
        # shortest edge -> 32 (bicubic), centre crop 32 x 32
        "clip": lambda: CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        # ConvNeXt below 384: shortest edge -> int(28 / 0.875) = 32, centre crop 28 x 28
        "convnext": lambda: ConvNextImageProcessor(size={"shortest_edge": 28}, crop_pct=0.875),
        # ConvNeXt from 384 up: a square resize, no crop
        "convnext-large": lambda: ConvNextImageProcessor(size={"shortest_edge": 384}),
        # square 36 x 36 (bicubic), centre crop 32 x 32
        "deit": lambda: DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}),
        # a plain square resize (bilinear)
        "vit": lambda: ViTImageProcessor(size={"height": 24, "width": 24}),
    }[kind]()


@pytest.mark.parametrize("kind", ["clip", "convnext", "convnext-large", "deit", "vit"])
def test_image_preprocessing_matches_the_hf_image_processor(tmp_path: Path, kind: str) -> None:
    """Non-square images: resized and centre-cropped as the processor does, never squashed unless it squashes."""
    from transformers import AutoImageProcessor

    from mmfuse.config import ImagePrep
    from mmfuse.data.image import load_image
    from mmfuse.data.pretrained_prep import image_prep_from_processor

    _hf_processor(kind).save_pretrained(str(tmp_path / kind))
    processor = AutoImageProcessor.from_pretrained(str(tmp_path / kind))  # what a user's folder loads as
    prep = image_prep_from_processor(ImagePrep(processor=str(tmp_path / kind)))
    rng = np.random.default_rng(0)
    for height, width in ((45, 80), (91, 40)) if kind != "convnext-large" else ((300, 500),):
        coarse = Image.fromarray(rng.integers(0, 256, size=(height // 4, width // 4, 3), dtype=np.uint8))
        path = tmp_path / f"{height}x{width}.png"
        coarse.resize((width, height), Image.Resampling.BICUBIC).save(path)  # smooth, non-square content
        ours = load_image(path, prep)
        with Image.open(path) as image:
            theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape, (height, width)
        std = torch.tensor(prep.std if isinstance(prep.std, tuple) else (prep.std,)).view(-1, 1, 1)
        difference = ((ours - theirs) * std * 255).abs()  # in 8-bit pixel levels
        # PIL (mmfuse) and torchvision (the processor) interpolate alike up to rounding.
        assert float(difference.mean()) < 0.5 and float(difference.max()) <= 3, (kind, height, width)
        squashed = load_image(path, prep.model_copy(update={"resize": "squash", "resize_size": None}))
        if kind not in ("convnext-large", "vit"):  # a crop is not a squash: the test tells them apart
            assert float(((squashed - theirs) * std * 255).abs().mean()) > 5


def test_normalize_dbfs_scales_the_clip(tiny: dict[str, Path], records: list[Record]) -> None:
    raw = raw_config(tiny)
    raw["data"]["audio"]["normalize_dbfs"] = -30
    config = validate_config(raw)
    _, batch = build(records, config)
    wave, valid = batch.inputs["audio"]["waveform"][0], batch.inputs["audio"]["sample_mask"][0]
    rms = wave[valid].square().mean().sqrt().item()
    assert abs(20 * np.log10(rms) + 30) < 0.01


# ---- the acceptance test: every fusion method on the tiny HF text/image/audio encoders -------------

@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_tiny_hf_encoders_train_with_every_fusion(tiny: dict[str, Path], records: list[Record], fusion: str) -> None:
    config = validate_config(raw_config(tiny, fusion, trainable="full"))
    model, batch = build(records, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = train_step(model, batch)
    assert torch.isfinite(loss)
    # Token-level fusions do not read a model's pooler (and vice versa): grads may be None there.
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(name.startswith(("fusion.", "head.")) for name in grads) or not list(model.fusion.parameters())
    for m in ("text", "image", "audio"):
        changed = [k for k in before if k.startswith(f"encoders.{m}.") and not torch.equal(before[k],
                                                                                            model.state_dict()[k])]
        assert changed, f"{fusion}: the {m} encoder did not train"
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (8, len(LABELS)) and torch.isfinite(out).all()


def test_lightning_training_and_reload_without_the_original_folders(
        tiny: dict[str, Path], records: list[Record], tmp_path: Path) -> None:
    """Trains through ``fit`` (Lightning), saves, deletes the source folders' copies, reloads identically."""
    import shutil

    copies = {k: tmp_path / "src" / k for k in tiny}
    for k, v in tiny.items():
        shutil.copytree(v, copies[k])
    manifest = tmp_path / "manifest.jsonl"
    with manifest.open("w") as f:
        for i, r in enumerate(records):
            row = {"id": r.id, **r.fields, "label": r.target, "split": "train" if i < 6 else "val"}
            f.write(json.dumps(row) + "\n")
    raw = raw_config(copies, trainable="last_n", n_layers=1)
    raw["data"] = {**raw["data"], "manifest": str(manifest), "batch_size": 4}
    del raw["data"]["synthetic"]
    raw["optim"] = {"lr": 0.01, "encoder_lr": 0.001}
    raw["trainer"] = {"max_epochs": 1, "patience": None, "output_dir": str(tmp_path / "run"), "progress_bar": False}
    config = validate_config(raw)
    data = prepare_data(config)
    result = fit(config, data)
    assert result.model_dir is not None
    files = {p.relative_to(result.model_dir).as_posix() for p in result.model_dir.rglob("*") if p.is_file()}
    assert {"encoders/text/config.json", "encoders/image/config.json", "encoders/image/preprocessor_config.json",
            "encoders/audio/config.json", "encoders/audio/preprocessor_config.json"} <= files
    assert any(f.startswith("tokenizers/text/") for f in files)
    batch = Collator(data.preprocessor, data.task)([build_sample(r, data.preprocessor, data.task) for r in records])
    with torch.no_grad():
        expected = result.model.eval()(batch)
    shutil.rmtree(tmp_path / "src")  # the original model folders are gone
    reloaded = MultimodalModel.from_pretrained(result.model_dir)
    batch2 = Collator(reloaded.preprocessor, reloaded.task)(
        [build_sample(r, reloaded.preprocessor, reloaded.task) for r in records])
    for m in batch.inputs:
        for k in batch.inputs[m]:
            assert torch.equal(batch.inputs[m][k], batch2.inputs[m][k])
    with torch.no_grad():
        assert torch.equal(reloaded(batch2), expected)


# ---- fine-tuning control -------------------------------------------------------------------------

def test_frozen_encoders_get_no_grad_and_keep_their_weights(tiny: dict[str, Path], records: list[Record]) -> None:
    config = validate_config(raw_config(tiny, image="resnet"))  # frozen is the default
    model, batch = build(records, config)
    encoders = {k: v.clone() for k, v in model.encoders.state_dict().items()}
    for m in model.modalities:
        encoder = model.encoders[m]
        assert isinstance(encoder, PretrainedEncoder) and encoder.frozen
        assert not any(p.requires_grad for p in encoder.parameters())
    model.train()
    # A frozen backbone stays in eval mode (dropout off, BatchNorm statistics fixed) while training.
    assert all(not mod.training for mod in model.encoders.modules() if mod is not model.encoders
               and not isinstance(mod, PretrainedEncoder))
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    for _ in range(2):
        train_step(model, batch)
    for k, v in model.encoders.state_dict().items():
        assert torch.equal(v, encoders[k]), f"frozen weight or BatchNorm buffer {k} changed"
    assert any(not torch.equal(v, head[k]) for k, v in model.head.state_dict().items())
    # The frozen encoders' outputs carry no autograd graph.
    assert not model.encoders["image"](batch.inputs["image"], batch.present["image"]).pooled.requires_grad


def test_last_n_trains_exactly_the_last_layers(tiny: dict[str, Path], records: list[Record]) -> None:
    config = validate_config(raw_config(tiny, trainable="last_n", n_layers=2))
    model, batch = build(records, config)
    text = model.encoders["text"]
    trainable = {n for n, p in text.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(n.startswith("backbone.encoder.layer.1.") or n.startswith("backbone.encoder.layer.2.")
               for n in trainable), sorted(trainable)
    assert {n for n, _ in text.named_parameters() if n.startswith(("backbone.encoder.layer.1.",
                                                                   "backbone.encoder.layer.2."))} == trainable
    # ViT: the last layer of 2 plus the final layernorm after the stack.
    vit = validate_config(raw_config(tiny, trainable="last_n", n_layers=1))
    model2, _ = build(records, vit)
    names = {n for n, p in model2.encoders["image"].named_parameters() if p.requires_grad}
    stack = "layers" if any(".layers.1." in n for n in names) else "encoder.layer"  # transformers 5 vs 4 names
    assert any(n.startswith(f"backbone.{stack}.1.") for n in names)
    assert not any(n.startswith((f"backbone.{stack}.0.", "backbone.embeddings.")) for n in names)
    assert {"backbone.layernorm.weight", "backbone.layernorm.bias", "backbone.pooler.dense.weight"} <= names
    before = {k: v.clone() for k, v in text.state_dict().items()}
    train_step(model, batch)
    for k, v in text.state_dict().items():
        assert torch.equal(v, before[k]) == (f"backbone.{k.removeprefix('backbone.')}" not in trainable), k
    with pytest.raises(ConfigError, match=r"hf_audio.: n_layers must be between 1 and 2 .the backbone has 2"):
        build(records, validate_config(raw_config(tiny, trainable="last_n", n_layers=4)))


def test_encoder_lr_param_groups(tiny: dict[str, Path], records: list[Record]) -> None:
    from mmfuse.config import OptimConfig

    model, _ = build(records, validate_config(raw_config(tiny, trainable="full")))
    groups = parameter_groups(model, OptimConfig(lr=1e-3, encoder_lr=1e-5))
    assert [(g["name"], g["lr"]) for g in groups] == [("fusion_head", 1e-3), ("encoders", 1e-5)]
    encoder_ids = {id(p) for p in model.encoders.parameters()}
    assert {id(p) for p in groups[1]["params"]} == encoder_ids
    assert not encoder_ids & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    frozen, _ = build(records, validate_config(raw_config(tiny)))
    assert [g["name"] for g in parameter_groups(frozen, OptimConfig(encoder_lr=1e-5))] == ["fusion_head"]


def test_gradient_checkpointing_and_dtype_options(tiny: dict[str, Path], records: list[Record]) -> None:
    config = validate_config(raw_config(tiny, trainable="full"))
    model, batch = build(records, config)
    config_ckpt = validate_config(raw_config(tiny, trainable="full", gradient_checkpointing=True))
    ckpt, _ = build(records, config_ckpt)
    backbone = ckpt.encoders["text"].backbone
    assert getattr(backbone, "is_activation_checkpointing", None) or backbone.is_gradient_checkpointing
    model.train()
    ckpt.train()
    # Dropout is random: compare in eval mode for values, then check gradients agree in train mode.
    for mod in (model, ckpt):
        for sub in mod.modules():
            if isinstance(sub, torch.nn.Dropout):
                sub.p = 0.0
    assert batch.target is not None
    for mod in (model, ckpt):
        mod.zero_grad()
        torch.manual_seed(0)  # wav2vec2 masks random time steps in training (SpecAugment)
        mod.task.loss(mod(batch), batch.target).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    bf16 = validate_config(raw_config(tiny, dtype="bfloat16"))
    model_bf16, batch = build(records, bf16)
    assert model_bf16.encoders["text"].backbone.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    f = model_bf16.encoders["text"](batch.inputs["text"], batch.present["text"])
    assert f.pooled.dtype == torch.float32 and torch.isfinite(f.pooled).all()
    with pytest.raises(ConfigError, match=r"valid options"):
        validate_config(raw_config(tiny, freeze_feature_encoder=True))  # only hf_audio has the option


def test_freeze_feature_encoder(tiny: dict[str, Path], records: list[Record]) -> None:
    raw = raw_config(tiny, trainable="full")
    raw["encoders"]["audio"]["freeze_feature_encoder"] = True
    model, _ = build(records, validate_config(raw))
    audio = model.encoders["audio"]
    conv = [p.requires_grad for n, p in audio.named_parameters() if "feature_extractor" in n]
    rest = [p.requires_grad for n, p in audio.named_parameters() if "encoder.layers" in n]
    assert conv and not any(conv) and rest and all(rest)


# ---- errors --------------------------------------------------------------------------------------

def test_preprocessing_mismatches_are_config_errors(tiny: dict[str, Path], records: list[Record]) -> None:
    raw = raw_config(tiny)
    del raw["data"]["text"]["tokenizer"]
    with pytest.raises(ConfigError, match=r"set data.text.tokenizer"):
        build(records, validate_config(raw))
    raw = raw_config(tiny)
    raw["data"]["image"] = {"size": 16}  # default mean/std, not the processor's
    with pytest.raises(ConfigError, match=r"set data.image.processor"):
        build(records, validate_config(raw))
    raw = raw_config(tiny)
    raw["data"]["image"] = {"size": 32, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    with pytest.raises(ConfigError, match=r"needs 16x16 images"):
        build(records, validate_config(raw))
    raw = raw_config(tiny)
    raw["data"]["audio"]["features"] = "log_mel"
    with pytest.raises(ConfigError, match=r"data.audio.features: waveform"):
        build(records, validate_config(raw))
    raw = raw_config(tiny)
    raw["data"]["audio"]["sample_rate"] = 8000
    with pytest.raises(ConfigError, match=r"expects 16000 Hz"):
        build(records, validate_config(raw))


def test_bad_model_folder_is_a_clear_error(tiny: dict[str, Path], records: list[Record], tmp_path: Path) -> None:
    raw = raw_config(tiny)
    raw["encoders"]["text"]["model"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"encoders.text.model: '.*nowhere' does not exist"):
        build(records, validate_config(raw))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny["bert"] / "config.json").read_text())  # config but no weights
    raw["encoders"]["text"]["model"] = str(broken)
    with pytest.raises(ConfigError, match=r"encoders.text.model: cannot load the Hugging Face model"):
        build(records, validate_config(raw))
    raw["encoders"]["text"]["model"] = "no-such-org/no-such-model"
    with pytest.raises(ConfigError, match=r"local cache only"):
        build(records, validate_config(raw))
    context = EncoderContext(kind="audio", audio_features="log_mel", sample_rate=16000, n_mels=40, n_fft=400,
                             hop_length=160)
    with pytest.raises(MMFuseError, match=r"package 'no_such_package_xyz' is not installed"):
        ENCODERS.create("ge2e_audio", context=context, weights="package:no_such_package_xyz/x.pt")


# ---- other architectures through the same factories -------------------------------------------------

def test_other_audio_architectures(tmp_path: Path) -> None:
    """Whisper's encoder and AST read their extractor's spectrograms; HuBERT reads raw samples."""
    from transformers import (
        ASTConfig,
        ASTFeatureExtractor,
        ASTModel,
        HubertConfig,
        HubertModel,
        Wav2Vec2FeatureExtractor,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    torch.manual_seed(0)
    WhisperModel(WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=100,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
                 ).save_pretrained(str(tmp_path / "whisper"))
    WhisperFeatureExtractor().save_pretrained(str(tmp_path / "whisper"))
    ASTModel(ASTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       max_length=100)).save_pretrained(str(tmp_path / "ast"))
    ASTFeatureExtractor(max_length=100).save_pretrained(str(tmp_path / "ast"))
    HubertModel(HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8,
                             num_conv_pos_embedding_groups=2)).save_pretrained(str(tmp_path / "hubert"))
    Wav2Vec2FeatureExtractor(sampling_rate=SR).save_pretrained(str(tmp_path / "hubert"))
    context = EncoderContext(kind="audio", audio_features="waveform", sample_rate=SR)
    wave = torch.randn(3, SR // 2) * 0.1
    valid = torch.ones(3, SR // 2, dtype=torch.bool)
    valid[1, SR // 4:] = False
    present = torch.tensor([True, True, False])
    expected = {"whisper": (False, 1500, [25, 13, 0]),  # 100 frames/s, halved by the encoder's stride-2 conv
                "ast": (False, 110, [110, 110, 0]),     # fixed-length patches: every token is valid
                "hubert": (True, 398, [398, 198, 0])}   # conv strides 5 x 4 over the valid samples
    for name, (raw, steps, valid_steps) in expected.items():
        encoder = ENCODERS.create("hf_audio", context=context, model=str(tmp_path / name))
        assert isinstance(encoder, PretrainedEncoder) and encoder.raw == raw  # type: ignore[attr-defined]
        f = encoder({"waveform": wave, "sample_mask": valid}, present)
        assert f.tokens.shape == (3, steps, 16) and f.mask.sum(dim=1).tolist() == valid_steps, name
        assert torch.isfinite(f.pooled).all() and torch.equal(f.pooled[2], torch.zeros(16))


def test_other_image_architectures(tmp_path: Path) -> None:
    """CLIP's vision tower (fixed size, CLIP normalisation from its processor) and ConvNeXt (any size)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(str(tmp_path / "clip"))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(str(tmp_path / "clip"))
    convnext = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    convnext.save_pretrained(str(tmp_path / "cnx"))
    from mmfuse.config import ImagePrep
    from mmfuse.data.pretrained_prep import image_prep_from_processor

    prep = image_prep_from_processor(ImagePrep(processor=str(tmp_path / "clip")))
    assert prep.size == 32 and prep.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    context = EncoderContext(kind="image", channels=3, image_size=32, image_mean=prep.mean,  # type: ignore[arg-type]
                             image_std=prep.std)  # type: ignore[arg-type]
    pixels = torch.randn(2, 3, 32, 32)
    clip = ENCODERS.create("hf_image", context=context, model=str(tmp_path / "clip"))
    f = clip({"pixels": pixels}, torch.ones(2, dtype=torch.bool))
    assert f.tokens.shape == (2, 17, 16) and f.pooled.shape == (2, 16)  # 16 patches + CLS
    cnx = ENCODERS.create("hf_image", context=context, model=str(tmp_path / "cnx"), channels_last=True)
    g = cnx({"pixels": pixels}, torch.ones(2, dtype=torch.bool))
    assert g.tokens.shape == (2, 16, 16) and torch.isfinite(g.pooled).all()  # a 4x4 map of 16 channels


def test_ge2e_and_sentence_transformers_models_reload_without_their_weight_files(
        tiny: dict[str, Path], records: list[Record], tmp_path: Path) -> None:
    """The weights file and model folder named in the config are gone when the saved model loads."""
    import shutil

    from mmfuse.encoders.pretrained.ge2e import GE2ENetwork

    torch.manual_seed(1)
    torch.save({"model_state": GE2ENetwork().state_dict()}, tmp_path / "ge2e.pt")
    shutil.copytree(tiny["bert"], tmp_path / "st")
    raw = raw_config({**tiny, "bert": tmp_path / "st"})
    raw["encoders"] = {"text": {"name": "sentence_transformers", "model": str(tmp_path / "st")},
                       "audio": {"name": "ge2e_audio", "weights": str(tmp_path / "ge2e.pt")}}
    raw["data"]["audio"] = {"sample_rate": SR, "n_mels": 40, "n_fft": 400, "hop_length": 160, "max_seconds": 0.5,
                            "pad_mode": "longest", "normalize_dbfs": -30}
    del raw["data"]["image"]
    model, batch = build(records, validate_config(raw))
    model.eval()
    with torch.no_grad():
        expected = model(batch)
    folder = model.save_pretrained(tmp_path / "model")
    (tmp_path / "ge2e.pt").unlink()
    shutil.rmtree(tmp_path / "st")
    reloaded = MultimodalModel.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(batch), expected)
    assert json.loads((folder / "encoders" / "text" / "sentence_transformers.json").read_text()) == {
        "pooling": "mean", "normalize": False}
