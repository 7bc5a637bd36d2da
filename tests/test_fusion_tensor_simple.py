"""Method-specific behaviour of weighted / attention / gated (fusion/simple.py) and tfn / lmf (fusion/tensor.py).

The shared fusion contract (shapes, missing modalities, gradients, determinism) is in test_fusion.py,
which is parametrised over every registered method; here each method's own maths is checked by hand,
and each must learn a small synthetic task.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.fusion import FUSIONS
from mmfuse.fusion.tensor import LowRankFusion, TensorFusion
from mmfuse.fusion.weighting import AttentionFusion, GatedFusion, WeightedFusion
from tests.test_fusion import DIMS3, OUT_DIM, PRESENCE3, TOKENS3, make_features

OURS = ["attention", "gated", "lmf", "tfn", "weighted"]
MODS = sorted(DIMS3)  # ["audio", "image", "text"]


def build(name: str, seed: int = 0, dims: dict[str, int] = DIMS3, **options: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    fusion = FUSIONS.create(name, dims=dims, out_dim=OUT_DIM, **options)
    fusion.eval()
    return fusion


def presence_matrix(features: dict[str, Features]) -> torch.Tensor:
    return torch.stack([features[m].present for m in MODS], dim=1)


@pytest.mark.parametrize("name", OURS)
def test_registered_and_accepts_the_common_options(name: str) -> None:
    """configs/synthetic.yaml sets proj_dim and hidden; switching fusion.name must keep it valid."""
    assert name in FUSIONS.names()
    assert FUSIONS.validate_options(name, {"proj_dim": 64, "hidden": 128, "dropout": 0.0}, where="fusion")
    with pytest.raises(ConfigError, match=r"fusion\.nope"):
        FUSIONS.validate_options(name, {"nope": 1}, where="fusion")


# ---- weighted ------------------------------------------------------------------------------------


def test_weighted_equals_renormalised_weighted_sum_by_hand() -> None:
    fusion = build("weighted")
    assert isinstance(fusion, WeightedFusion)
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([0.3, -1.2, 0.8]))
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    with torch.no_grad():
        out = fusion(features)
        for row in range(out.shape[0]):
            present = [i for i, m in enumerate(MODS) if features[m].present[row]]
            z = torch.zeros(fusion.mix[0].in_features)
            if present:
                w = torch.softmax(fusion.logits[present], dim=0)
                for wi, i in zip(w, present, strict=True):
                    m = MODS[i]
                    z = z + wi * fusion.project[m](features[m].pooled[row : row + 1])[0]
            expected = fusion.mix(z[None])[0]
            assert torch.allclose(out[row], expected, atol=1e-6), f"row {row}"


def test_weighted_weights_are_zero_for_absent_and_sum_to_one() -> None:
    fusion = build("weighted")
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    present = presence_matrix(features)
    w = fusion.modality_weights(features)
    assert w.shape == (6, 3)
    assert (w[~present] == 0).all()
    any_present = present.any(dim=1)
    assert torch.allclose(w[any_present].sum(dim=1), torch.ones(int(any_present.sum())))
    assert (w[~any_present] == 0).all()
    # All present at initialisation (zero logits): equal weights. Input-independent: rows with the
    # same presence pattern get the same weights.
    assert torch.allclose(w[0], torch.full((3,), 1 / 3))


# ---- attention -----------------------------------------------------------------------------------


def test_attention_weights_masked_softmax_and_input_dependent() -> None:
    fusion = build("attention")
    assert isinstance(fusion, AttentionFusion)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    present = presence_matrix(features)
    alpha = fusion.modality_weights(features)
    assert alpha.shape == (6, 3)
    assert (alpha[~present] == 0).all()
    assert (alpha[present] > 0).all()
    any_present = present.any(dim=1)
    assert torch.allclose(alpha[any_present].sum(dim=1), torch.ones(int(any_present.sum())))
    assert (alpha[5] == 0).all()  # row 5 has nothing present
    # A single present modality gets all the attention.
    assert torch.allclose(alpha[4], torch.tensor([0.0, 0.0, 1.0]))
    # Input-dependent: two all-present samples with different inputs get different weights.
    all_present = make_features(DIMS3, TOKENS3, {m: [True, True] for m in DIMS3}, seed=4)
    a2 = fusion.modality_weights(all_present)
    assert not torch.allclose(a2[0], a2[1])


def test_attention_output_is_mlp_of_attended_sum() -> None:
    fusion = build("attention")
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    with torch.no_grad():
        alpha = fusion.modality_weights(features)
        z = torch.zeros(6, fusion.score[0].in_features)
        for i, m in enumerate(MODS):
            projected = fusion.project[m](features[m].pooled)
            z = z + torch.where(features[m].present[:, None], alpha[:, i : i + 1] * projected, torch.zeros(()))
        assert torch.allclose(fusion(features), fusion.mix(z), atol=1e-6)


# ---- gated ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_gated_gates_renormalised_over_present(gate: str) -> None:
    fusion = build("gated", gate=gate)
    assert isinstance(fusion, GatedFusion)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    present = presence_matrix(features)
    gates = fusion.modality_weights(features)
    assert gates.shape == (6, 3, fusion.proj_dim)
    assert (gates[~present] == 0).all()
    any_present = present.any(dim=1)
    sums = gates.sum(dim=1)
    assert torch.allclose(sums[any_present], torch.ones_like(sums[any_present]))
    assert (sums[~any_present] == 0).all()
    # Per-feature gates (GMU's z is a vector), not one scalar per modality.
    assert not torch.allclose(gates[0, 0], gates[0, 0, :1].expand(fusion.proj_dim))


def _gmu_by_hand(fusion: GatedFusion, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Arevalo et al. 2017, eqs. (1)-(4), for M=2, from the module's weights only:

    h_1 = tanh(W_1 x_1), h_2 = tanh(W_2 x_2), z = sigmoid(W_z [x_1; x_2] + b_z), h = z h_1 + (1 - z) h_2.

    W_1/W_2 are the transforms (Linear, then this library's LayerNorm, written out by hand). The
    module's gate Linear emits one logit row block per modality and normalises them with a softmax
    over the two; softmax(l_1, l_2)_1 = sigmoid(l_1 - l_2), so the paper's single W_z is the first
    block minus the second. Returns (z, h).
    """
    def transform(m: str, x: torch.Tensor) -> torch.Tensor:
        linear, norm = fusion.transform[m][0], fusion.transform[m][1]
        a = x @ linear.weight.T + linear.bias
        a = (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + norm.eps)
        return torch.tanh(a * norm.weight + norm.bias)

    p = fusion.proj_dim
    w, b = fusion.gate.weight, fusion.gate.bias  # (2P, D_1 + D_2), (2P,)
    w_z, b_z = w[:p] - w[p:], b[:p] - b[p:]
    z = torch.sigmoid(torch.cat([x1, x2], dim=-1) @ w_z.T + b_z)  # the gate reads the INPUTS x
    return z, z * transform("image", x1) + (1 - z) * transform("text", x2)


def test_gated_two_modalities_is_the_published_gmu() -> None:
    dims = {"image": 5, "text": 7}
    fusion = build("gated", dims=dims, proj_dim=6)
    assert isinstance(fusion, GatedFusion)
    # Inputs of a large scale: tanh(h) saturates, so a gate that read h instead of x would differ.
    features = make_features(dims, {"image": 2, "text": 3}, {"image": [True] * 4, "text": [True] * 4})
    x1, x2 = 3.0 * features["image"].pooled, 3.0 * features["text"].pooled
    features = {m: Features(tokens=f.tokens, mask=f.mask, pooled=x, present=f.present)
                for (m, f), x in zip(features.items(), (x1, x2), strict=True)}
    with torch.no_grad():
        z, h = _gmu_by_hand(fusion, x1, x2)
        gates = fusion.modality_weights(features)
        assert torch.allclose(gates[:, 0], z, atol=1e-6) and torch.allclose(gates[:, 1], 1 - z, atol=1e-6)
        assert torch.allclose(fusion(features), fusion.mix(h), atol=1e-5)


def test_gated_sigmoid_option_is_the_m_modality_gmu_renormalised() -> None:
    """gate="sigmoid": the paper's M-modality z_m = sigmoid(W_zm [x_1; ...; x_M]), renormalised."""
    dims = {"image": 5, "text": 7}
    fusion = build("gated", dims=dims, proj_dim=6, gate="sigmoid")
    features = make_features(dims, {"image": 2, "text": 3}, {"image": [True] * 4, "text": [True] * 4})
    x = torch.cat([features["image"].pooled, features["text"].pooled], dim=-1)
    with torch.no_grad():
        z = torch.sigmoid(x @ fusion.gate.weight.T + fusion.gate.bias).view(4, 2, 6)
        assert torch.allclose(fusion.modality_weights(features), z / z.sum(dim=1, keepdim=True), atol=1e-6)


def test_gated_missing_embedding_only_feeds_the_gate_of_rows_that_lack_it() -> None:
    fusion = build("gated")
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    with torch.no_grad():
        before = fusion(features)
        fusion.missing["audio"].add_(torch.randn_like(fusion.missing["audio"]))
        after = fusion(features)
    audio_present = features["audio"].present
    assert torch.equal(before[audio_present], after[audio_present])
    # Row 1 lacks audio and has two present modalities, whose gates depend on the missing embedding.
    assert not torch.allclose(before[1], after[1])


def test_gated_bad_gate_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'gate' must be 'softmax' or 'sigmoid', got 'relu'"):
        FUSIONS.create("gated", dims=DIMS3, out_dim=OUT_DIM, gate="relu")


# ---- tfn -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dims", "rank_dim"), [(DIMS3, 8), ({"image": 5, "text": 7}, 5), ({"x": 3}, 4)])
def test_tfn_tensor_product_dimension_and_terms(dims: dict[str, int], rank_dim: int) -> None:
    fusion = build("tfn", dims=dims, rank_dim=rank_dim)
    assert isinstance(fusion, TensorFusion)
    n = len(dims)
    assert fusion.product_dim == (rank_dim + 1) ** n
    lengths = {m: 2 for m in dims}
    features = make_features(dims, lengths, {m: [True, True, False] for m in dims})
    with torch.no_grad():
        product = fusion.tensor_product(features)
        assert product.shape == (3, (rank_dim + 1) ** n)
        cube = product.view(3, *([rank_dim + 1] * n))
        # The all-"1" corner is the constant term, and each axis at the other modalities' "1" index
        # holds that modality's own projection (the unimodal terms the appended 1 preserves).
        assert torch.allclose(cube[(slice(None),) + (-1,) * n], torch.ones(3))
        for axis, m in enumerate(sorted(dims)):
            index: list[slice | int] = [slice(None)] + [-1] * n
            index[axis + 1] = slice(0, rank_dim)
            z = fusion.project[m](features[m].pooled)
            z = torch.where(features[m].present[:, None], z, fusion.missing[m])
            assert torch.allclose(cube[tuple(index)], z, atol=1e-6)
    # The first layer of the MLP sees the whole product.
    assert fusion(features).shape == (3, OUT_DIM)


def test_tfn_default_size_is_small() -> None:
    fusion = build("tfn")
    assert fusion.product_dim == 9**3 == 729


def test_tfn_guards_the_product_size() -> None:
    with pytest.raises(ConfigError, match=r"rank_dim=60 .* 226,981 entries.*max_product=100,000.*lower fusion\.rank_dim"
                       r" \(rank_dim=45 fits\)"):
        TensorFusion(DIMS3, OUT_DIM, rank_dim=60)
    with pytest.raises(ConfigError, match=r"lower fusion\.rank_dim"):
        FUSIONS.create("tfn", dims={f"m{i}": 4 for i in range(6)}, out_dim=OUT_DIM)  # 9^6 = 531,441
    # Raising the limit explicitly allows it; a small product passes the default.
    assert TensorFusion({"a": 3, "b": 3}, OUT_DIM, rank_dim=60, hidden=0, max_product=5000).product_dim == 61**2
    with pytest.raises(ConfigError, match=r"rank_dim"):
        TensorFusion(DIMS3, OUT_DIM, rank_dim=0)


def test_tfn_without_subnetwork() -> None:
    fusion = build("tfn", proj_dim=0, rank_dim=4)
    out = fusion(make_features(DIMS3, TOKENS3, PRESENCE3))
    assert out.shape == (6, OUT_DIM) and torch.isfinite(out).all()


# ---- lmf -----------------------------------------------------------------------------------------


def test_lmf_factors_are_registered_parameters() -> None:
    fusion = build("lmf", rank=3, proj_dim=16)
    assert isinstance(fusion, LowRankFusion)
    params = list(fusion.parameters())
    param_ids = {id(p) for p in params}
    assert sorted(fusion.factors.keys()) == MODS  # one factor per modality
    for m in MODS:
        factor = fusion.factors[m]
        assert factor.shape == (3, 16 + 1, OUT_DIM)
        assert id(factor) in param_ids
        assert f"factors.{m}" in fusion.state_dict()
    # Per modality: projection Linear (2) + LayerNorm (2) + missing embedding + factor = 6; plus the
    # rank weights and bias. MultiBench's count here is 3, its factors being invisible to PyTorch.
    assert len(params) == 6 * len(MODS) + 2


def test_lmf_every_parameter_trains() -> None:
    fusion = build("lmf")
    fusion.train()
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    before = {n: p.detach().clone() for n, p in fusion.named_parameters()}
    assert any(n.startswith("factors.") for n in before)
    optimiser = torch.optim.Adam(fusion.parameters(), lr=1e-2)
    target = torch.randn(6, OUT_DIM, generator=torch.Generator().manual_seed(0))
    loss = F.mse_loss(fusion(features), target)
    optimiser.zero_grad()
    loss.backward()
    for name, param in fusion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} gets no gradient"
    optimiser.step()
    for name, param in fusion.named_parameters():
        assert not torch.equal(param.detach(), before[name]), f"{name} did not change after a step"


def test_lmf_equals_tfn_with_a_rank_r_weight_tensor() -> None:
    """Liu et al. 2018, eq. (5)-(6): LMF is TFN's h = W . Z + b with W = sum_r w_r (x)_m W_m^(r).

    The full weight tensor W (P+1, P+1, P+1, F) is built from LMF's factors, the full TFN product
    Z = [p_1; 1] (x) [p_2; 1] (x) [p_3; 1] (B, P+1, P+1, P+1) is formed explicitly, and their
    contraction must be LMF's output, which never forms either.
    """
    rank, proj_dim = 3, 4
    fusion = build("lmf", rank=rank, proj_dim=proj_dim)
    features = make_features(DIMS3, TOKENS3, PRESENCE3)
    with torch.no_grad():
        a, b, c = (fusion.factors[m] for m in MODS)  # each (rank, P+1, F)
        weight = torch.einsum("r,rif,rjf,rkf->ijkf", fusion.fusion_weights, a, b, c)
        assert weight.shape == (proj_dim + 1,) * 3 + (OUT_DIM,)
        ones = torch.ones(6, 1)
        p1 = [torch.cat([torch.where(features[m].present[:, None], fusion.project[m](features[m].pooled),
                                     fusion.missing[m]), ones], dim=-1) for m in MODS]
        product = torch.einsum("bi,bj,bk->bijk", *p1)  # TFN's tensor, with the appended 1s
        expected = torch.einsum("bijk,ijkf->bf", product, weight) + fusion.fusion_bias
        assert torch.allclose(fusion(features), expected, atol=1e-5)
        # The constant corner of Z is 1, so W's corner is the bias-like term TFN keeps.
        assert torch.equal(product[:, -1, -1, -1], torch.ones(6))


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_lmf_rank_option(rank: int) -> None:
    fusion = build("lmf", rank=rank)
    assert fusion.rank == rank
    assert fusion.fusion_weights.shape == (rank,)
    assert all(f.shape[0] == rank for f in fusion.factors.values())
    out = fusion(make_features(DIMS3, TOKENS3, PRESENCE3))
    assert out.shape == (6, OUT_DIM) and torch.isfinite(out).all()


def test_lmf_hidden_adds_an_output_layer() -> None:
    fusion = build("lmf", hidden=20)
    assert all(f.shape[-1] == 20 for f in fusion.factors.values())
    assert fusion(make_features(DIMS3, TOKENS3, PRESENCE3)).shape == (6, OUT_DIM)
    with pytest.raises(ConfigError, match=r"rank"):
        LowRankFusion(DIMS3, OUT_DIM, rank=0)


# ---- each method learns --------------------------------------------------------------------------

LEARN_DIMS = {"a": 4, "b": 4, "c": 4}  # c is a distractor


def synthetic_task(n: int, seed: int, kind: str) -> tuple[dict[str, Features], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, d, generator=gen) for m, d in LEARN_DIMS.items()}
    if kind == "interaction":  # XOR of signs: no single modality, nor a sum of them, predicts it
        y = ((x["a"][:, 0] > 0) ^ (x["b"][:, 0] > 0)).long()
    else:  # additive
        y = (x["a"][:, 0] + x["b"][:, 0] > 0).long()
    ones = torch.ones(n, dtype=torch.bool)
    features = {m: Features(tokens=v[:, None], mask=ones[:, None], pooled=v, present=ones) for m, v in x.items()}
    return features, y



@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("name", "kind"),
    [("weighted", "additive"), ("attention", "interaction"), ("gated", "interaction"), ("tfn", "interaction"),
     ("lmf", "interaction")],
)
def test_method_learns_a_synthetic_task(name: str, kind: str) -> None:
    torch.manual_seed(0)
    fusion = FUSIONS.create(name, dims=LEARN_DIMS, out_dim=2)
    train, y_train = synthetic_task(256, 0, kind)
    test, y_test = synthetic_task(512, 1, kind)
    optimiser = torch.optim.Adam(fusion.parameters(), lr=1e-2)
    fusion.train()
    for _ in range(150):
        loss = F.cross_entropy(fusion(train), y_train)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    fusion.eval()
    with torch.no_grad():
        accuracy = (fusion(test).argmax(dim=1) == y_test).float().mean().item()
    assert accuracy > 0.75, f"{name} reaches only {accuracy:.3f} held-out accuracy on the {kind} task (chance 0.5)"
