"""Every registered encoder against the encoder contract (mmfuse.encoders.base).

Parametrised over ``ENCODERS.names()``; each encoder is built on the context of the modality kind it
accepts and fed inputs shaped as ``mmfuse.data.dataset.Collator`` builds them.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mmfuse.core.contracts import EncoderContext
from mmfuse.core.errors import ConfigError
from mmfuse.encoders import ENCODERS, Encoder
from mmfuse.encoders.pretrained import PRETRAINED_ENCODERS

NAMES = [n for n in ENCODERS.names() if n not in PRETRAINED_ENCODERS]  # see tests/test_pretrained.py
VOCAB, MAX_LEN, CHANNELS, SIZE, N_MELS, MAX_FRAMES = 40, 16, 3, 16, 16, 40
FEATURE_DIM, FEATURE_STEPS = 11, 12
VIDEO_FRAMES = 4

CONTEXTS = {
    "text": EncoderContext(kind="text", vocab_size=VOCAB, max_length=MAX_LEN),
    "image": EncoderContext(kind="image", channels=CHANNELS, image_size=SIZE),
    "audio": EncoderContext(kind="audio", n_mels=N_MELS, max_frames=MAX_FRAMES),
    "features": EncoderContext(kind="features", feature_dim=FEATURE_DIM, max_length=FEATURE_STEPS),
    "video": EncoderContext(kind="video", channels=CHANNELS, image_size=SIZE, max_length=VIDEO_FRAMES),
}
PRESENT = torch.tensor([True, True, False, True, True])


ACCEPTED = {
    "audio_cnn": ["audio"],
    "identity": ["features"],
    "image_cnn": ["image"],
    "lenet": ["image", "audio"],
    "sequence": ["features"],
    "text_gru": ["text"],
    "text_transformer": ["text"],
    "video_frames": ["video"],
}
"""The modality kinds each registered (non-pretrained) encoder reads, written out rather than asked of
the code: ``test_each_encoder_reads_exactly_its_kinds`` holds the code to it, and a new encoder
needs its line here."""
KINDS = {name: kinds[0] for name, kinds in ACCEPTED.items()}
"""The kind each encoder is tested on (the first it reads; e.g. ``lenet`` reads image or audio)."""


def kinds_of(name: str) -> list[str]:
    """The modality kinds the encoder builds on; on every other kind it must raise a ConfigError."""
    accepted = []
    for kind, context in CONTEXTS.items():
        try:
            ENCODERS.create(name, context=context)
        except ConfigError:
            continue
        accepted.append(kind)
    return accepted


def build(name: str, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    encoder = ENCODERS.create(name, context=CONTEXTS[KINDS[name]])
    encoder.eval()
    return encoder


def text_inputs(lengths: list[int], width: int | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Collated text: ids padded with 0 to the longest (or ``width``), a bool attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = width or max(1, *lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[i, :n] = True
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(batch: int, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randn(batch, CHANNELS, SIZE, SIZE, generator=gen)}


def audio_inputs(frames: list[int], width: int = MAX_FRAMES, seed: int = 0) -> dict[str, Tensor]:
    """Collated audio: log-mel (B, n_mels, width) zero-padded, frame_mask (B, width)."""
    gen = torch.Generator().manual_seed(seed)
    mel = torch.zeros(len(frames), N_MELS, width)
    mask = torch.zeros(len(frames), width, dtype=torch.bool)
    for i, n in enumerate(frames):
        mel[i, :, :n] = torch.randn(N_MELS, n, generator=gen) * 3 - 5
        mask[i, :n] = True
    return {"mel": mel, "frame_mask": mask}


def feature_inputs(steps: list[int], width: int | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Collated features: values (B, width, D) zero-padded to the longest, a bool step mask."""
    gen = torch.Generator().manual_seed(seed)
    width = width or max(1, *steps)
    values = torch.zeros(len(steps), width, FEATURE_DIM)
    mask = torch.zeros(len(steps), width, dtype=torch.bool)
    for i, n in enumerate(steps):
        # Dimensions on very different scales, as OpenFace/COVAREP features are.
        values[i, :n] = torch.randn(n, FEATURE_DIM, generator=gen) * torch.logspace(-2, 2, FEATURE_DIM)
        mask[i, :n] = True
    return {"values": values, "mask": mask}


def inputs_for(kind: str, present: Tensor = PRESENT, seed: int = 0) -> dict[str, Tensor]:
    """A batch as the collator makes it: absent rows are zeros (empty text, zero pixels/mel)."""
    batch = len(present)
    if kind == "text":
        lengths = [0 if not p else 3 + (5 * i) % 11 for i, p in enumerate(present.tolist())]
        return text_inputs(lengths, seed=seed)
    if kind == "image":
        out = image_inputs(batch, seed=seed)
        out["pixels"][~present] = 0
        return out
    if kind == "features":
        return feature_inputs([0 if not p else 1 + (5 * i) % FEATURE_STEPS for i, p in enumerate(present.tolist())],
                              seed=seed)
    if kind == "video":  # clips of 1..VIDEO_FRAMES frames, padded frames and absent rows zero and masked
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch, VIDEO_FRAMES, CHANNELS, SIZE, SIZE, generator=gen)
        mask = torch.zeros(batch, VIDEO_FRAMES, dtype=torch.bool)
        for i, p in enumerate(present.tolist()):
            mask[i, : 0 if not p else 1 + (3 * i) % VIDEO_FRAMES] = True
        return {"pixels": pixels * mask[:, :, None, None, None], "frame_mask": mask}
    frames = [0 if not p else 17 + (7 * i) % 23 for i, p in enumerate(present.tolist())]
    return audio_inputs(frames, seed=seed)


def select(inputs: dict[str, Tensor], rows: slice | list[int]) -> dict[str, Tensor]:
    return {k: v[rows] for k, v in inputs.items()}


def test_each_encoder_reads_exactly_its_kinds() -> None:
    assert sorted(NAMES) == sorted(ACCEPTED), "a registered encoder is missing from ACCEPTED, or one is gone"
    for name, kinds in ACCEPTED.items():
        assert kinds_of(name) == kinds, name
        assert build(name).kind == kinds[0], name


@pytest.mark.parametrize("name", NAMES)
def test_feature_shapes(name: str) -> None:
    encoder = build(name)
    kind = KINDS[name]
    assert encoder.kind == kind
    f = encoder(inputs_for(kind), PRESENT)
    batch, dim = len(PRESENT), encoder.out_dim
    assert f.tokens.ndim == 3 and f.tokens.shape[0] == batch and f.tokens.shape[2] == dim
    assert f.mask.shape == f.tokens.shape[:2] and f.mask.dtype == torch.bool
    assert f.pooled.shape == (batch, dim)
    assert f.present.shape == (batch,) and torch.equal(f.present, PRESENT)
    assert f.dim == dim
    for t in (f.tokens, f.pooled):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    # Present rows have at least one valid token and non-trivial features.
    assert f.mask[PRESENT].any(dim=1).all()
    assert (f.pooled[PRESENT].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_absent_rows_are_zero_and_masked(name: str) -> None:
    encoder = build(name)
    kind = KINDS[name]
    inputs = inputs_for(kind)
    # Even if an absent row held real-looking values, none may leak out.
    leaky = inputs_for(kind, present=torch.ones_like(PRESENT), seed=4)
    for train in (False, True):
        encoder.train(train)
        for batch_inputs in (inputs, leaky):
            f = encoder(batch_inputs, PRESENT)
            absent = ~PRESENT
            assert torch.equal(f.pooled[absent], torch.zeros_like(f.pooled[absent]))
            assert torch.equal(f.tokens[absent], torch.zeros_like(f.tokens[absent]))
            assert not f.mask[absent].any()


@pytest.mark.parametrize("name", NAMES)
def test_rows_do_not_depend_on_other_rows(name: str) -> None:
    encoder = build(name)
    kind = KINDS[name]
    inputs = inputs_for(kind)
    with torch.no_grad():
        batched = encoder(inputs, PRESENT)
        for row in torch.nonzero(PRESENT).flatten().tolist():
            alone = encoder(select(inputs, [row]), PRESENT[[row]])
            assert torch.allclose(alone.pooled[0], batched.pooled[row], atol=1e-5), f"row {row}"
            steps = alone.tokens.shape[1]
            assert torch.allclose(alone.tokens[0], batched.tokens[row, :steps], atol=1e-5)
            assert torch.equal(alone.mask[0], batched.mask[row, :steps])
        # Replacing the other rows with different data changes nothing for row 0.
        other = inputs_for(kind, seed=9)
        mixed = {k: torch.cat([v[:1], other[k][1:]]) for k, v in inputs.items()}
        assert torch.allclose(encoder(mixed, PRESENT).pooled[0], batched.pooled[0], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    encoder = build(name)
    encoder.train()
    kind = KINDS[name]
    f = encoder(inputs_for(kind), PRESENT)
    gen = torch.Generator().manual_seed(1)
    loss = (f.pooled * torch.randn(f.pooled.shape, generator=gen)).sum() + (
        f.tokens * torch.randn(f.tokens.shape, generator=gen)
    ).sum()
    loss.backward()
    for pname, param in encoder.named_parameters():
        assert param.grad is not None, f"{name}: {pname} gets no gradient"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{name}: {pname} gets a zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_fixed_seed(name: str) -> None:
    kind = KINDS[name]
    inputs = inputs_for(kind)
    with torch.no_grad():
        a = build(name, seed=3)(inputs, PRESENT)
        b = build(name, seed=3)(inputs, PRESENT)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one_and_all_absent(name: str) -> None:
    encoder = build(name)
    kind = KINDS[name]
    one = torch.tensor([True])
    f = encoder(inputs_for(kind, present=one), one)
    assert f.pooled.shape == (1, encoder.out_dim) and torch.isfinite(f.pooled).all()
    none = torch.zeros(3, dtype=torch.bool)
    f = encoder(inputs_for(kind, present=none), none)
    assert torch.isfinite(f.tokens).all()
    assert torch.equal(f.pooled, torch.zeros_like(f.pooled)) and not f.mask.any()


@pytest.mark.parametrize("name", [n for n in NAMES if KINDS[n] == "text"])
def test_text_row_with_zero_tokens_is_finite(name: str) -> None:
    encoder = build(name)
    inputs = text_inputs([0, 4, 0])
    present = torch.tensor([True, True, True])  # present but empty: must not produce NaN
    for train in (False, True):
        encoder.train(train)
        f = encoder(inputs, present)
        assert torch.isfinite(f.tokens).all() and torch.isfinite(f.pooled).all()
        assert not f.mask[0].any() and not f.mask[2].any()
    # A whole batch of empty rows too.
    f = encoder(text_inputs([0, 0]), torch.tensor([True, True]))
    assert torch.isfinite(f.pooled).all()


@pytest.mark.parametrize("name", [n for n in NAMES if KINDS[n] == "text"])
def test_text_padding_does_not_change_pooled(name: str) -> None:
    encoder = build(name)
    lengths = [5, 9, 2]
    present = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        tight = encoder(text_inputs(lengths), present)
        wide_inputs = text_inputs(lengths, width=MAX_LEN)
        wide = encoder(wide_inputs, present)
        # Garbage ids in the padding positions (beyond the mask) must not matter either.
        garbage = wide_inputs["input_ids"].clone()
        garbage[~wide_inputs["attention_mask"]] = 7
        noisy = encoder({"input_ids": garbage, "attention_mask": wide_inputs["attention_mask"]}, present)
    assert torch.allclose(tight.pooled, wide.pooled, atol=1e-5)
    assert torch.allclose(wide.pooled, noisy.pooled, atol=1e-5)
    # Valid tokens are unchanged too.
    for i, n in enumerate(lengths):
        assert torch.allclose(tight.tokens[i, :n], noisy.tokens[i, :n], atol=1e-5)
    # Sanity: the actual words do matter.
    with torch.no_grad():
        other = encoder(text_inputs(lengths, seed=5), present)
    assert not torch.allclose(tight.pooled, other.pooled, atol=1e-3)


@pytest.mark.parametrize("name", [n for n in NAMES if KINDS[n] == "audio"])
def test_audio_padding_values_do_not_change_pooled(name: str) -> None:
    encoder = build(name)
    frames = [16, 40, 24]
    present = torch.ones(3, dtype=torch.bool)
    inputs = audio_inputs(frames)
    noisy_mel = inputs["mel"].clone()
    pad = ~inputs["frame_mask"]
    noisy_mel.masked_scatter_(pad[:, None, :].expand_as(noisy_mel), torch.randn(int(pad.sum()) * N_MELS) * 100)
    with torch.no_grad():
        clean = encoder(inputs, present)
        noisy = encoder({"mel": noisy_mel, "frame_mask": inputs["frame_mask"]}, present)
    assert torch.allclose(clean.pooled, noisy.pooled, atol=1e-5)
    # A clip's gain (a constant log-mel offset) is standardised away.
    with torch.no_grad():
        louder = encoder({"mel": inputs["mel"] + 4.0 * inputs["frame_mask"][:, None, :],
                          "frame_mask": inputs["frame_mask"]}, present)
    assert torch.allclose(clean.pooled, louder.pooled, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in NAMES if KINDS[n] == "audio"])
def test_audio_padding_length_does_not_change_pooled(name: str) -> None:
    """pad_mode 'longest' pads each batch to its longest clip: a clip must not see how much."""
    encoder = build(name)
    frames = [17, 23, 8]
    present = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        tight = encoder(audio_inputs(frames, width=23), present)
        wide = encoder(audio_inputs(frames, width=MAX_FRAMES), present)
        assert torch.allclose(tight.pooled, wide.pooled, atol=1e-5)
        steps = tight.tokens.shape[1]
        assert torch.allclose(tight.tokens, wide.tokens[:, :steps], atol=1e-5)
        assert torch.equal(tight.mask, wide.mask[:, :steps]) and not wide.mask[:, steps:].any()
        # Each clip alone, padded to nothing but its own length, as in a batch of one.
        batch = audio_inputs(frames, width=MAX_FRAMES)
        for i, n in enumerate(frames):
            alone = encoder({"mel": batch["mel"][i : i + 1, :, :n], "frame_mask": batch["frame_mask"][i : i + 1, :n]},
                            present[:1])
            assert torch.allclose(alone.pooled[0], wide.pooled[i], atol=1e-5), f"clip of {n} frames"


@pytest.mark.parametrize(
    ("name", "wrong"),
    [("image_cnn", "text"), ("text_transformer", "audio"), ("text_gru", "image"), ("audio_cnn", "image"),
     ("identity", "audio"), ("sequence", "text"), ("audio_cnn", "features")],
)
def test_wrong_kind_is_a_config_error(name: str, wrong: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}.*'{wrong}'"):
        ENCODERS.create(name, context=CONTEXTS[wrong])


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"divisible"):
        ENCODERS.create("text_transformer", context=CONTEXTS["text"], dim=30, heads=4)
    with pytest.raises(ConfigError, match=r"channels"):
        ENCODERS.create("image_cnn", context=CONTEXTS["image"], channels=())
    with pytest.raises(ConfigError, match=r"valid options"):
        ENCODERS.validate_options("image_cnn", {"chanels": [8]}, where="encoders.image")


@pytest.mark.parametrize("name", [n for n in NAMES if KINDS[n] == "features"])
def test_feature_padding_does_not_change_outputs(name: str) -> None:
    """A sequence's features do not depend on how much its batch pads it, nor on padding values."""
    encoder = build(name)
    steps = [5, 12, 1]
    present = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        tight_inputs = feature_inputs(steps)
        tight = encoder(tight_inputs, present)
        wide_inputs = feature_inputs(steps, width=FEATURE_STEPS)
        wide_inputs["values"][~wide_inputs["mask"]] = 1e3
        wide = encoder(wide_inputs, present)
        alone = [encoder({"values": tight_inputs["values"][i : i + 1, :n], "mask": tight_inputs["mask"][i : i + 1, :n]},
                         present[:1]) for i, n in enumerate(steps)]
        other = encoder(feature_inputs(steps, seed=5), present)
    assert torch.allclose(tight.pooled, wide.pooled, atol=1e-5)
    for i, n in enumerate(steps):
        assert torch.allclose(tight.tokens[i, :n], wide.tokens[i, :n], atol=1e-5)
        assert torch.equal(wide.tokens[i, n:], torch.zeros_like(wide.tokens[i, n:]))  # padding steps are zeros
        assert torch.allclose(alone[i].pooled[0], tight.pooled[i], atol=1e-5)
    assert torch.equal(wide.mask, wide_inputs["mask"])
    assert not torch.allclose(tight.pooled, other.pooled, atol=1e-3)  # the values do matter


def test_identity_pooled_is_the_masked_mean_of_projected_steps() -> None:
    torch.manual_seed(0)
    encoder = ENCODERS.create("identity", context=CONTEXTS["features"], dim=5, norm=False)
    inputs = feature_inputs([3, 1])
    f = encoder(inputs, torch.ones(2, dtype=torch.bool))
    proj = encoder.proj
    assert isinstance(proj, torch.nn.Linear)
    expected0 = (inputs["values"][0, :3] @ proj.weight.T + proj.bias).mean(dim=0)
    assert torch.allclose(f.pooled[0], expected0, atol=1e-5)
    assert torch.allclose(f.pooled[1], inputs["values"][1, 0] @ proj.weight.T + proj.bias, atol=1e-5)
    # dim=0 and no norm: a true identity, pooled = mean of the raw values, no parameters.
    raw = ENCODERS.create("identity", context=CONTEXTS["features"], dim=0, norm=False)
    assert raw.out_dim == FEATURE_DIM and not list(raw.parameters())
    g = raw(inputs, torch.ones(2, dtype=torch.bool))
    assert torch.allclose(g.pooled[0], inputs["values"][0, :3].mean(dim=0))
    assert torch.equal(g.tokens, inputs["values"])


def test_feature_encoder_errors() -> None:
    with pytest.raises(ConfigError, match=r"divisible"):
        ENCODERS.create("sequence", context=CONTEXTS["features"], dim=30, heads=4)
    with pytest.raises(ConfigError, match=r"feature width is unknown"):
        ENCODERS.create("identity", context=EncoderContext(kind="features"))
    seq = ENCODERS.create("sequence", context=CONTEXTS["features"], layers=0)
    assert seq.out_dim == 64
    with pytest.raises(ValueError, match=r"exceeds max_length 12"):
        seq(feature_inputs([FEATURE_STEPS + 1]), torch.ones(1, dtype=torch.bool))


# ---- absent rows in training mode -----------------------------------------------------------------

BUILTIN = [n for n in NAMES if ENCODERS.get(n).__module__ == "mmfuse.encoders.builtin"]
"""The encoders of ``mmfuse.encoders.builtin`` on every kind each accepts (``lenet``: image and audio)."""


def absent_garbage(kind: str, inputs: dict[str, Tensor], present: Tensor, fill: float) -> dict[str, Tensor]:
    """``inputs`` with every absent row overwritten by ``fill`` (huge, NaN, inf) and marked as valid."""
    out = {k: v.clone() for k, v in inputs.items()}
    absent = ~present
    if kind == "text":
        out["input_ids"][absent] = torch.randint(1, VOCAB, out["input_ids"][absent].shape)
        out["attention_mask"][absent] = True
    else:
        key = {"image": "pixels", "audio": "mel", "features": "values"}[kind]
        out[key][absent] = fill
        for mask in ("frame_mask", "mask"):
            if mask in out:
                out[mask][absent] = True
    return out


def _train_step(encoder: Encoder, inputs: dict[str, Tensor], present: Tensor,
                state: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """One train-mode forward/backward from ``state``: pooled, tokens, buffers after, gradients."""
    encoder.load_state_dict(state)
    encoder.zero_grad()
    encoder.train()
    torch.manual_seed(0)  # the same dropout masks for every call
    f = encoder(inputs, present)
    loss = f.pooled.sum() + f.tokens.sum()
    if loss.requires_grad:  # not when no row is present and nothing ran
        loss.backward()
    buffers = {k: v.clone() for k, v in encoder.named_buffers()}
    grads = {k: p.grad.clone() for k, p in encoder.named_parameters() if p.grad is not None}
    return f.pooled.detach(), f.tokens.detach(), buffers, grads


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n in BUILTIN for k in ACCEPTED[n]])
def test_train_mode_absent_rows_cannot_move_present_rows(name: str, kind: str) -> None:
    """BatchNorm (``lenet``) once took batch statistics over absent rows too: their inputs moved the
    present rows' features by up to 2.3 and entered the running statistics. Now garbage, NaN or inf
    in absent rows changes nothing: present rows' outputs, running stats, parameter gradients."""
    torch.manual_seed(0)
    # lenet's default 5 audio layers would pool the test's 16 mel bands away.
    options = {"layers": 2} if (name, kind) == ("lenet", "audio") else {}
    encoder = ENCODERS.create(name, context=CONTEXTS[kind], **options)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    inputs = inputs_for(kind)
    pooled, tokens, buffers, grads = _train_step(encoder, inputs, PRESENT, state)
    assert torch.isfinite(pooled).all() and (pooled[PRESENT].abs().sum(dim=1) > 0).all()
    for fill in (1e4,) if kind == "text" else (1e4, float("nan"), float("inf")):  # text: random ids
        bad = absent_garbage(kind, inputs, PRESENT, fill)
        b_pooled, b_tokens, b_buffers, b_grads = _train_step(encoder, bad, PRESENT, state)
        assert torch.allclose(b_pooled[PRESENT], pooled[PRESENT], atol=1e-6, rtol=0), f"fill {fill}"
        assert torch.allclose(b_tokens[PRESENT], tokens[PRESENT], atol=1e-6, rtol=0), f"fill {fill}"
        assert torch.equal(b_pooled[~PRESENT], torch.zeros_like(b_pooled[~PRESENT]))
        for key, value in buffers.items():
            assert torch.allclose(b_buffers[key], value, atol=1e-6, rtol=0), f"fill {fill}: buffer {key}"
        for key, value in grads.items():
            assert torch.allclose(b_grads[key], value, atol=1e-5, rtol=1e-5), f"fill {fill}: gradient {key}"


def test_lenet_batchnorm_running_stats_come_from_present_rows_only() -> None:
    """The running statistics equal those of a batch that holds only the present rows."""
    torch.manual_seed(0)
    encoder = ENCODERS.create("lenet", context=CONTEXTS["image"], norm="batch")
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    inputs = inputs_for("image")
    _, _, mixed, _ = _train_step(encoder, inputs, PRESENT, state)
    rows = torch.nonzero(PRESENT).flatten().tolist()
    _, _, alone, _ = _train_step(encoder, select(inputs, rows), PRESENT[rows], state)
    means = [k for k in mixed if k.endswith("running_mean")]
    assert means and all(not torch.equal(mixed[k], state[k]) for k in means)  # statistics did move
    for key, value in alone.items():
        assert torch.allclose(mixed[key], value, atol=1e-6, rtol=0), key
    # A batch with no present row trains nothing and leaves the statistics untouched.
    none = torch.zeros(3, dtype=torch.bool)
    pooled, _, after, _ = _train_step(encoder, inputs_for("image", present=none), none, state)
    assert torch.equal(pooled, torch.zeros_like(pooled))
    for key, value in after.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key


# ---- finish_features ------------------------------------------------------------------------------


def test_finish_features_turns_nan_and_inf_of_absent_rows_into_exact_zeros() -> None:
    """``tokens * keep`` kept NaN (NaN * 0 = NaN); absent rows must come out as exact zeros."""
    from mmfuse.encoders.base import finish_features

    present = torch.tensor([True, False, False, True])
    tokens = torch.randn(4, 3, 5)
    tokens[1] = float("nan")
    tokens[2, 0] = float("inf")
    tokens[2, 1] = float("-inf")
    pooled = torch.randn(4, 5)
    pooled[1], pooled[2] = float("nan"), float("inf")
    mask = torch.ones(4, 3, dtype=torch.bool)
    f = finish_features(tokens, mask, pooled, present)
    assert torch.equal(f.tokens[~present], torch.zeros(2, 3, 5))
    assert torch.equal(f.pooled[~present], torch.zeros(2, 5))
    assert torch.equal(f.tokens[present], tokens[present]) and torch.equal(f.pooled[present], pooled[present])
    assert f.mask.tolist() == [[True] * 3, [False] * 3, [False] * 3, [True] * 3]
    assert torch.equal(f.present, present)


def test_lenet_audio_sees_padding_as_silence() -> None:
    """A padded clip reads as the clip followed by real silence, whatever the padding holds."""
    from mmfuse.data.audio import SILENCE_LOG_MEL

    encoder = ENCODERS.create("lenet", context=CONTEXTS["audio"], layers=2).eval()
    padded = audio_inputs([17, 40, 25])
    padded["mel"][~padded["frame_mask"][:, None, :].expand_as(padded["mel"])] = float("nan")
    silent = {"mel": torch.where(padded["frame_mask"][:, None, :], padded["mel"], SILENCE_LOG_MEL),
              "frame_mask": torch.ones_like(padded["frame_mask"])}
    present = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        a, b = encoder(padded, present), encoder(silent, present)
    assert torch.isfinite(a.pooled).all() and torch.equal(a.pooled, b.pooled)
