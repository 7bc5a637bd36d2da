"""Method-specific behaviour of the sequence/graph fusion methods: mult, coattention, bottleneck, graph.

The shared contract (shapes, absent-sample garbage, padding, gradients, determinism) is in
test_fusion.py; here: cross-modal information flows where the method says it does and nowhere
else, and every method learns a cross-modal interaction that no single modality predicts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.fusion import FUSIONS
from mmfuse.fusion.bottleneck import BottleneckFusion
from mmfuse.fusion.coattention import CoAttentionFusion
from mmfuse.fusion.graph import GraphFusion
from mmfuse.fusion.mult import MulTFusion

DIMS = {"audio": 10, "image": 8, "text": 12}
LENGTHS = {"audio": 5, "image": 4, "text": 7}
# Row 0: all present; row 1: image absent; row 2: text absent; row 3: only audio; row 4: nothing.
PRESENCE = {
    "audio": [True, True, True, True, False],
    "image": [True, False, True, False, False],
    "text": [True, True, False, False, False],
}
METHODS = ["bottleneck", "coattention", "graph", "mult"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: on a small shared CPU, intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_features(seed: int = 0, dims: dict[str, int] = DIMS, lengths: dict[str, int] = LENGTHS,
                  presence: dict[str, list[bool]] = PRESENCE) -> dict[str, Features]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in sorted(dims):
        present = torch.tensor(presence[m])
        batch, length = len(present), lengths[m]
        valid = torch.randint(1, length + 1, (batch,), generator=gen)
        mask = (torch.arange(length)[None] < valid[:, None]) & present[:, None]
        tokens = torch.randn(batch, length, dims[m], generator=gen)
        out[m] = Features(tokens=tokens, mask=mask, pooled=torch.randn(batch, dims[m], generator=gen), present=present)
    return out


def with_modality(features: dict[str, Features], m: str, f: Features) -> dict[str, Features]:
    changed = dict(features)
    changed[m] = f
    return changed


def perturbed(f: Features, rows: torch.Tensor | None = None, value: float | None = None, seed: int = 1) -> Features:
    """``f`` with new tokens and pooled values in ``rows`` (default: all), random or a constant."""
    gen = torch.Generator().manual_seed(seed)
    tokens, pooled = f.tokens.clone(), f.pooled.clone()
    rows = torch.ones(len(f.present), dtype=torch.bool) if rows is None else rows
    new_tokens = torch.randn(tokens.shape, generator=gen) if value is None else torch.full_like(tokens, value)
    new_pooled = torch.randn(pooled.shape, generator=gen) if value is None else torch.full_like(pooled, value)
    tokens[rows], pooled[rows] = new_tokens[rows], new_pooled[rows]
    return Features(tokens=tokens, mask=f.mask, pooled=pooled, present=f.present)


def build(name: str, seed: int = 0, **options: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    fusion = FUSIONS.create(name, dims=DIMS, out_dim=4, **options)
    return fusion.eval()


def rows_where(**flags: bool) -> torch.Tensor:
    """Rows of PRESENCE whose presence matches every given modality flag."""
    keep = torch.ones(len(PRESENCE["audio"]), dtype=torch.bool)
    for m, flag in flags.items():
        keep &= torch.tensor(PRESENCE[m]) == flag
    return keep


# ---- mult ------------------------------------------------------------------------------------------


def test_mult_has_a_cross_modal_transformer_per_ordered_pair() -> None:
    fusion = build("mult", layers=2)
    assert isinstance(fusion, MulTFusion)
    assert set(fusion.cross) == {f"{n}->{m}" for m in DIMS for n in DIMS if n != m}
    assert all(len(blocks) == 2 for blocks in fusion.cross.values())


def test_mult_cross_modal_flow_follows_presence_and_masks() -> None:
    fusion = build("mult")
    assert isinstance(fusion, MulTFusion)
    features = make_features()
    with torch.no_grad():
        reference = fusion.target_states(features)
        # Changing the image (source) changes the text target's state where both are present ...
        changed = fusion.target_states(with_modality(features, "image", perturbed(features["image"])))
        both = rows_where(text=True, image=True)
        assert not torch.allclose(changed["text"][both], reference["text"][both])
        # ... and nowhere the image is absent, even with NaN garbage in its rows.
        image_absent = ~features["image"].present
        nan_image = perturbed(features["image"], rows=image_absent, value=float("nan"))
        garbage = fusion.target_states(with_modality(features, "image", nan_image))
        for m in DIMS:
            assert torch.equal(garbage[m], reference[m])
        assert torch.equal(changed["text"][image_absent], reference["text"][image_absent])
        # Padding tokens (mask False) of a present source change nothing.
        f = features["image"]
        padded = Features(torch.where(f.mask[..., None], f.tokens, torch.full_like(f.tokens, 1e6)), f.mask,
                          f.pooled, f.present)
        for m, state in fusion.target_states(with_modality(features, "image", padded)).items():
            assert torch.equal(state, reference[m])


def test_mult_works_with_very_different_sequence_lengths() -> None:
    lengths = {"audio": 1, "image": 3, "text": 40}
    fusion = build("mult")
    out = fusion(make_features(lengths=lengths))
    assert out.shape == (5, 4) and torch.isfinite(out).all()


# ---- coattention -----------------------------------------------------------------------------------


def test_coattention_has_both_directions_of_every_pair() -> None:
    fusion = build("coattention", layers=2)
    assert isinstance(fusion, CoAttentionFusion)
    assert fusion.pairs == [("audio", "image"), ("audio", "text"), ("image", "text")]
    expected = {f"{a}->{b}" for a in DIMS for b in DIMS if a != b}
    assert len(fusion.co) == 2
    for layer in fusion.co:
        assert set(layer) == expected


def test_coattention_flows_both_ways_between_present_modalities_only() -> None:
    fusion = build("coattention")
    assert isinstance(fusion, CoAttentionFusion)
    features = make_features()
    both = rows_where(text=True, image=True)
    with torch.no_grad():
        reference = fusion.modality_states(features)
        for source, target in (("image", "text"), ("text", "image")):
            changed = fusion.modality_states(with_modality(features, source, perturbed(features[source])))
            assert not torch.allclose(changed[target][both], reference[target][both]), f"{source}->{target}"
            absent = ~features[source].present
            nan = perturbed(features[source], rows=absent, value=float("nan"))
            for m, state in fusion.modality_states(with_modality(features, source, nan)).items():
                assert torch.equal(state, reference[m])


# ---- bottleneck ------------------------------------------------------------------------------------


def test_bottleneck_without_fusion_layers_keeps_modalities_apart() -> None:
    fusion = build("bottleneck", layers=2, fusion_layer=2)
    assert isinstance(fusion, BottleneckFusion)
    assert fusion.bottlenecks is None
    features = make_features()
    with torch.no_grad():
        reference = fusion.encode(features)
        changed = fusion.encode(with_modality(features, "image", perturbed(features["image"])))
    assert reference.bottleneck is None
    assert not torch.allclose(changed.cls["image"][0], reference.cls["image"][0])
    assert torch.equal(changed.cls["text"], reference.cls["text"])
    assert torch.equal(changed.cls["audio"], reference.cls["audio"])


def test_bottleneck_fusion_layers_exchange_through_the_bottleneck_only_when_present() -> None:
    # Two fusion layers: the bottleneck written in the first is read by every CLS in the second.
    fusion = build("bottleneck", layers=3, fusion_layer=1, n_bottlenecks=3)
    assert isinstance(fusion, BottleneckFusion)
    assert fusion.bottlenecks is not None and fusion.bottlenecks.shape == (3, 64)
    features = make_features()
    both = rows_where(text=True, image=True)
    image_absent = ~features["image"].present
    with torch.no_grad():
        reference = fusion.encode(features)
        changed = fusion.encode(with_modality(features, "image", perturbed(features["image"])))
        assert not torch.allclose(changed.cls["text"][both], reference.cls["text"][both])
        assert torch.equal(changed.cls["text"][image_absent], reference.cls["text"][image_absent])
        assert reference.bottleneck is not None and changed.bottleneck is not None
        assert not torch.allclose(changed.bottleneck[both], reference.bottleneck[both])
        assert torch.equal(changed.bottleneck[image_absent], reference.bottleneck[image_absent])
        # A row with nothing present keeps the learned initial bottleneck.
        nothing = rows_where(audio=False, image=False, text=False)
        expected = fusion.norm(fusion.bottlenecks)
        assert torch.allclose(reference.bottleneck[nothing], expected.expand_as(reference.bottleneck[nothing]))


def test_bottleneck_default_single_fusion_layer_still_fuses() -> None:
    fusion = build("bottleneck")  # layers=2, fusion_layer=1: only the readout sees the fused bottleneck
    features = make_features()
    both = rows_where(text=True, image=True)
    with torch.no_grad():
        reference = fusion(features)
        changed = fusion(with_modality(features, "image", perturbed(features["image"])))
        # The text CLS cannot hear the image yet, but the bottleneck in the readout does.
        assert not torch.allclose(changed[both], reference[both])


def test_bottleneck_rejects_a_fusion_layer_beyond_the_stack() -> None:
    with pytest.raises(ConfigError, match="fusion_layer"):
        FUSIONS.create("bottleneck", dims=DIMS, out_dim=4, layers=2, fusion_layer=3)


# ---- graph -----------------------------------------------------------------------------------------


def test_graph_absent_nodes_neither_send_nor_receive() -> None:
    fusion = build("graph")
    assert isinstance(fusion, GraphFusion)
    features = make_features()
    with torch.no_grad():
        reference, present = fusion.node_states(features)
        # Sends nothing: an absent image node's value (even NaN) changes no node state.
        image_absent = ~features["image"].present
        nan = perturbed(features["image"], rows=image_absent, value=float("nan"))
        assert torch.equal(fusion.node_states(with_modality(features, "image", nan))[0], reference)
        # Receives nothing: changing the present nodes leaves an absent node's state unchanged.
        changed = features
        for m in ("audio", "text"):
            changed = with_modality(changed, m, perturbed(features[m], seed=5))
        states, _ = fusion.node_states(changed)
    image = sorted(DIMS).index("image")
    assert torch.equal(states[image_absent, image], reference[image_absent, image])
    # ... while a present image node does hear from the others.
    assert not torch.allclose(states[~image_absent, image], reference[~image_absent, image])
    assert torch.equal(present, torch.stack([features[m].present for m in sorted(DIMS)], dim=1))


def test_graph_sample_with_one_present_node_equals_that_node_alone() -> None:
    fusion = build("graph")
    torch.manual_seed(0)
    alone = FUSIONS.create("graph", dims={"audio": DIMS["audio"]}, out_dim=4).eval()
    # Same shared weights, audio's own projection and node embedding.
    missing, unexpected = alone.load_state_dict(fusion.state_dict(), strict=False)
    assert not missing and all(".image" in k or ".text" in k for k in unexpected)
    features = make_features()
    only_audio = rows_where(audio=True, image=False, text=False)
    assert only_audio.sum() == 1
    with torch.no_grad():
        out = fusion(features)
        single = alone({"audio": features["audio"]})
    assert torch.allclose(out[only_audio], single[only_audio], atol=1e-6)


# ---- all four --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_width_not_divisible_by_heads_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="divisible"):
        FUSIONS.create(name, dims=DIMS, out_dim=4, dim=30, heads=4)


@pytest.mark.parametrize("name", METHODS)
def test_one_modality_does_not_crash(name: str) -> None:
    torch.manual_seed(0)
    fusion = FUSIONS.create(name, dims={"text": 6}, out_dim=3)
    features = make_features(dims={"text": 6}, lengths={"text": 5}, presence={"text": [True, False, True]})
    out = fusion(features)
    assert out.shape == (3, 3) and torch.isfinite(out).all()


def interaction_data(n: int, seed: int) -> tuple[dict[str, Features], torch.Tensor]:
    """Label = sign(z_a) XOR sign(z_b), where every valid token of modality a carries z_a along a fixed
    direction under token noise (likewise b); each modality alone is at chance. A third, pure-noise
    modality is absent in a quarter of the samples; padding tokens hold large noise.
    """
    gen = torch.Generator().manual_seed(seed)
    dims, lengths = {"a": 6, "b": 5, "noise": 4}, {"a": 4, "b": 6, "noise": 3}
    features, signs = {}, []
    for m in sorted(dims):
        z = torch.randn(n, generator=gen)
        direction = torch.ones(dims[m]) / dims[m] ** 0.5
        tokens = 0.2 * torch.randn(n, lengths[m], dims[m], generator=gen) + z[:, None, None] * direction
        valid = torch.randint(1, lengths[m] + 1, (n,), generator=gen)
        present = torch.ones(n, dtype=torch.bool) if m != "noise" else torch.rand(n, generator=gen) > 0.25
        mask = (torch.arange(lengths[m])[None] < valid[:, None]) & present[:, None]
        tokens = torch.where(mask[..., None], tokens, 10 * torch.randn(tokens.shape, generator=gen))
        pooled = torch.where(mask[..., None], tokens, 0).sum(1) / valid[:, None]
        features[m] = Features(tokens=tokens, mask=mask, pooled=pooled, present=present)
        if m != "noise":
            signs.append(z > 0)
    return features, (signs[0] ^ signs[1]).long()


@pytest.mark.parametrize("name", METHODS)
def test_learns_a_cross_modal_interaction(name: str) -> None:
    train_x, train_y = interaction_data(256, seed=0)
    test_x, test_y = interaction_data(256, seed=1)
    torch.manual_seed(0)
    fusion = FUSIONS.create(name, dims={"a": 6, "b": 5, "noise": 4}, out_dim=2, dim=32)
    optimizer = torch.optim.Adam(fusion.parameters(), lr=3e-3, foreach=True)
    fusion.train()
    order = torch.Generator().manual_seed(0)
    for _ in range(150):  # minibatches of 64 from the 256 training samples
        rows = torch.randperm(256, generator=order)[:64]
        batch = {m: Features(f.tokens[rows], f.mask[rows], f.pooled[rows], f.present[rows])
                 for m, f in train_x.items()}
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(fusion(batch), train_y[rows])
        loss.backward()
        optimizer.step()
    fusion.eval()
    with torch.no_grad():
        accuracy = (fusion(test_x).argmax(-1) == test_y).float().mean().item()
    assert accuracy > 0.75, f"{name}: held-out accuracy {accuracy:.2f} on an XOR task (chance 0.5)"
