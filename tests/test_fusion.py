"""Every registered fusion method against the fusion contract (mmfuse.fusion.base).

The contract tests are parametrised over ``FUSIONS.names()`` so a newly registered method is held to
them the day it is added; method-specific behaviour (concat's missing embedding, late fusion's
average of votes) is tested by hand below.
"""

from __future__ import annotations

import pytest
import torch

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.fusion import FUSIONS, Fusion

METHODS = FUSIONS.names()
OUT_DIM = 6

# Different widths and token lengths per modality, so no method can assume they agree.
DIMS3 = {"text": 12, "image": 8, "audio": 10}
TOKENS3 = {"text": 7, "image": 4, "audio": 5}

# (B=6) Each modality is present in some rows and absent in others; row 5 has nothing at all.
PRESENCE3 = {
    "audio": [True, False, True, True, False, False],
    "image": [True, True, False, True, False, False],
    "text": [True, True, True, False, True, False],
}


def make_features(
    dims: dict[str, int],
    lengths: dict[str, int],
    presence: dict[str, list[bool]],
    seed: int = 0,
    requires_grad: bool = False,
) -> dict[str, Features]:
    """Synthetic features shaped like an encoder's output (absent rows zeroed, mask all False)."""
    gen = torch.Generator().manual_seed(seed)
    features = {}
    for m in sorted(dims):
        present = torch.tensor(presence[m])
        batch, length, dim = len(present), lengths[m], dims[m]
        # Variable valid lengths per row, at least one valid token for present rows.
        valid = torch.randint(1, length + 1, (batch,), generator=gen)
        mask = (torch.arange(length)[None] < valid[:, None]) & present[:, None]
        tokens = torch.randn(batch, length, dim, generator=gen) * mask[..., None]
        pooled = torch.randn(batch, dim, generator=gen) * present[:, None]
        tokens.requires_grad_(requires_grad)
        pooled.requires_grad_(requires_grad)
        features[m] = Features(tokens=tokens, mask=mask, pooled=pooled, present=present)
    return features


def build(name: str, dims: dict[str, int] = DIMS3, seed: int = 0) -> Fusion:
    torch.manual_seed(seed)
    fusion = FUSIONS.create(name, dims=dims, out_dim=OUT_DIM)
    fusion.eval()
    return fusion


def replace_row(f: Features, row: int, tokens: torch.Tensor, pooled: torch.Tensor,
                mask: torch.Tensor | None = None) -> Features:
    new_tokens, new_pooled, new_mask = f.tokens.clone(), f.pooled.clone(), f.mask.clone()
    new_tokens[row] = tokens
    new_pooled[row] = pooled
    if mask is not None:
        new_mask[row] = mask
    return Features(tokens=new_tokens, mask=new_mask, pooled=new_pooled, present=f.present.clone())


# ---- the contract, for every registered method --------------------------------------------------


def test_registry_lists_the_builtins() -> None:
    assert {"concat", "late"} <= set(METHODS)
    assert sorted(METHODS) == METHODS


@pytest.mark.parametrize("name", METHODS)
def test_output_shape_and_finite(name: str) -> None:
    fusion = build(name)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    out = fusion(features)
    assert out.shape == (6, OUT_DIM)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Not a constant map: rows with different inputs give different outputs.
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", METHODS)
def test_train_mode_output_finite(name: str) -> None:
    fusion = build(name)
    fusion.train()
    out = fusion(make_features(DIMS3, TOKENS3, PRESENCE3))
    assert out.shape == (6, OUT_DIM)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_inputs_and_every_parameter(name: str) -> None:
    fusion = build(name)
    features = make_features(DIMS3, TOKENS3, PRESENCE3, requires_grad=True)
    out = fusion(features)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()

    for m, f in features.items():
        grads = [g for g in (f.pooled.grad, f.tokens.grad) if g is not None]
        assert grads, f"{name}: no gradient reaches modality '{m}'"
        assert all(torch.isfinite(g).all() for g in grads)
        present = f.present
        reached = sum(g.flatten(1).abs().sum(dim=1) for g in grads)
        assert isinstance(reached, torch.Tensor)
        assert (reached[present] > 0).all(), f"{name}: a present '{m}' row gets no gradient"
        # An absent row's values must not influence the output, so they get no gradient.
        assert (reached[~present] == 0).all(), f"{name}: an absent '{m}' row gets a gradient"

    for pname, param in fusion.named_parameters():
        assert param.grad is not None, f"{name}: parameter {pname} gets no gradient"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{name}: parameter {pname} gets a zero gradient"


@pytest.mark.parametrize("name", METHODS)
def test_dict_order_does_not_matter(name: str) -> None:
    fusion = build(name)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    reordered = {m: features[m] for m in reversed(list(features))}
    rotated = {m: features[m] for m in ["image", "audio", "text"]}
    assert list(reordered) != list(features)
    out = fusion(features)
    assert torch.equal(out, fusion(reordered))
    assert torch.equal(out, fusion(rotated))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("garbage", ["random", "huge", "nan"])
def test_absent_modality_values_are_ignored(name: str, garbage: str) -> None:
    fusion = build(name)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    with torch.no_grad():
        reference = fusion(features)
    gen = torch.Generator().manual_seed(7)
    for m, f in features.items():
        for row in torch.nonzero(~f.present).flatten().tolist():
            tokens = torch.randn(f.tokens.shape[1:], generator=gen)
            pooled = torch.randn(f.pooled.shape[1:], generator=gen)
            if garbage == "huge":
                tokens, pooled = tokens * 1e30, pooled * 1e30
            elif garbage == "nan":
                tokens, pooled = torch.full_like(tokens, float("nan")), torch.full_like(pooled, float("nan"))
            # Even a mask that claims valid tokens must not matter when present=False.
            mask = torch.rand(f.mask.shape[1:], generator=gen) > 0.3
            changed = dict(features)
            changed[m] = replace_row(f, row, tokens, pooled, mask)
            with torch.no_grad():
                out = fusion(changed)
            assert torch.equal(out[row], reference[row]), f"{name}: absent '{m}' row {row} leaks ({garbage})"
            assert torch.equal(out, reference), f"{name}: absent '{m}' row {row} changes other rows"


@pytest.mark.parametrize("name", METHODS)
def test_padding_tokens_of_present_rows_are_ignored(name: str) -> None:
    fusion = build(name)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    with torch.no_grad():
        reference = fusion(features)
    changed = {}
    for m, f in features.items():
        tokens = torch.where(f.mask[..., None], f.tokens, torch.full_like(f.tokens, 1e6))
        changed[m] = Features(tokens=tokens, mask=f.mask, pooled=f.pooled, present=f.present)
    with torch.no_grad():
        assert torch.equal(fusion(changed), reference)


@pytest.mark.parametrize("name", METHODS)
def test_present_modality_values_matter(name: str) -> None:
    fusion = build(name)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    other = make_features(DIMS3, TOKENS3, PRESENCE3, seed=3)
    with torch.no_grad():
        reference = fusion(features)
        for m in features:
            changed = dict(features)
            changed[m] = other[m]
            out = fusion(changed)
            rows = features[m].present
            assert not torch.allclose(out[rows], reference[rows]), f"{name} ignores present '{m}'"
            assert torch.equal(out[~rows], reference[~rows])


@pytest.mark.parametrize("name", METHODS)
def test_batch_of_one(name: str) -> None:
    fusion = build(name)
    features = make_features(DIMS3, TOKENS3, {m: [True] for m in DIMS3})
    out = fusion(features)
    assert out.shape == (1, OUT_DIM)
    assert torch.isfinite(out).all()
    fusion.train()  # e.g. batch statistics must not break on B=1
    assert torch.isfinite(fusion(features)).all()


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    "dims",
    [
        {"image": 9, "text": 5},
        {"audio": 4, "image": 9, "text": 5},
        {"body": 6, "image": 3, "speech": 11, "title": 7},
    ],
    ids=["2-modalities", "3-modalities", "4-custom-names"],
)
def test_any_number_of_modalities(name: str, dims: dict[str, int]) -> None:
    fusion = build(name, dims=dims)
    lengths = {m: 2 + i for i, m in enumerate(sorted(dims))}
    presence = {m: [True, i % 2 == 0, True, False] for i, m in enumerate(sorted(dims))}
    out = fusion(make_features(dims, lengths, presence))
    assert out.shape == (4, OUT_DIM)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_all_modalities_absent_row_is_finite(name: str) -> None:
    fusion = build(name)
    presence = {m: [False, False] for m in DIMS3}
    presence["text"] = [True, False]
    for train in (False, True):
        fusion.train(train)
        out = fusion(make_features(DIMS3, TOKENS3, presence))
        assert out.shape == (2, OUT_DIM)
        assert torch.isfinite(out).all()
    # Nothing at all in the whole batch.
    fusion.eval()
    out = fusion(make_features(DIMS3, TOKENS3, {m: [False, False, False] for m in DIMS3}))
    assert torch.isfinite(out).all()
    # With nothing present every row sees the same (no) information. Rows may differ in the last
    # bits (a BLAS kernel can treat rows of one matmul differently), never by more.
    torch.testing.assert_close(out[1:], out[:1].expand(2, -1), rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_under_a_fixed_seed(name: str) -> None:
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    a, b = build(name, seed=123), build(name, seed=123)
    with torch.no_grad():
        assert torch.equal(a(features), b(features))
    a.train()
    b.train()
    torch.manual_seed(5)
    out_a = a(features)
    torch.manual_seed(5)
    out_b = b(features)
    assert torch.equal(out_a, out_b)
    # A different seed gives a different initialisation.
    with torch.no_grad():
        assert not torch.equal(build(name, seed=124)(features), build(name, seed=123)(features))


@pytest.mark.parametrize("name", METHODS)
def test_missing_features_key_is_a_clear_error(name: str) -> None:
    fusion = build(name)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    del features["image"]
    with pytest.raises((ValueError, KeyError), match=r"image"):
        fusion(features)


@pytest.mark.parametrize("name", METHODS)
def test_all_state_is_registered(name: str) -> None:
    """Weights kept outside nn.Parameter/buffers (MultiBench's LMF bug) would not survive these."""
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    a, b = build(name, seed=1), build(name, seed=2)
    assert list(a.parameters()), f"{name} has no parameters"
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(features), b(features))
    # Every tensor follows .to(dtype): a float64 module gives a float64 output.
    a.to(torch.float64)
    as64 = {m: Features(f.tokens.double(), f.mask, f.pooled.double(), f.present) for m, f in features.items()}
    with torch.no_grad():
        out = a(as64)
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), b(features).detach(), atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_no_modalities_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError):
        FUSIONS.create(name, dims={}, out_dim=OUT_DIM)


def test_unknown_fusion_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"valid choices: .*concat.*late"):
        FUSIONS.create("concatt", dims=DIMS3, out_dim=OUT_DIM)


# ---- method-specific behaviour ---------------------------------------------------------------------


def test_concat_uses_its_learned_missing_embedding() -> None:
    fusion = build("concat")
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    with torch.no_grad():
        before = fusion(features)
        fusion.missing["image"].add_(torch.randn_like(fusion.missing["image"]))
        after = fusion(features)
    image_absent = ~features["image"].present
    assert image_absent.any() and (~image_absent).any()
    for row in range(before.shape[0]):
        if image_absent[row]:
            assert not torch.allclose(before[row], after[row]), f"row {row} ignores missing['image']"
        else:
            assert torch.equal(before[row], after[row]), f"row {row} uses missing['image'] though present"


def test_concat_absent_equals_missing_embedding_by_hand() -> None:
    fusion = build("concat")
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    parts = []
    for m in sorted(DIMS3):
        f = features[m]
        projected = fusion.project[m](f.pooled)
        parts.append(torch.where(f.present[:, None], projected, fusion.missing[m].expand_as(projected)))
    with torch.no_grad():
        expected = fusion.mix(torch.cat(parts, dim=-1))
        assert torch.allclose(fusion(features), expected, atol=1e-6)


def test_late_fusion_is_the_mean_of_present_votes() -> None:
    fusion = build("late")
    assert fusion.decision_level is True
    assert FUSIONS.get("late").decision_level is True  # type: ignore[attr-defined]
    assert not getattr(FUSIONS.get("concat"), "decision_level", False)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    with torch.no_grad():
        out = fusion(features)
        for row in range(out.shape[0]):
            votes = [fusion.heads[m](features[m].pooled[row : row + 1])[0]
                     for m in sorted(DIMS3) if features[m].present[row]]
            expected = torch.stack(votes).mean(dim=0) if votes else torch.zeros(OUT_DIM)
            assert torch.allclose(out[row], expected, atol=1e-6), f"row {row}"
    # Row 5 has no modality: all-zero logits, a uniform prediction.
    assert torch.equal(out[5], torch.zeros(OUT_DIM))
    # A row with only text present is exactly the text head's vote.
    only_text = 4
    assert [features[m].present[only_text].item() for m in sorted(DIMS3)] == [False, False, True]
    with torch.no_grad():
        assert torch.allclose(out[only_text], fusion.heads["text"](features["text"].pooled[only_text]), atol=1e-6)
