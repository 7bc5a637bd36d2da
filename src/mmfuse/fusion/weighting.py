"""Weighted sums of modalities: learned scalar weights, input-dependent attention, GMU gates."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.layers import mlp
from mmfuse.core.masking import present_pooled, stack_presence
from mmfuse.core.registry import FUSIONS
from mmfuse.fusion.base import Fusion, check_positive, masked_softmax, projector


@FUSIONS.register("weighted")
class WeightedFusion(Fusion):
    """Learned weighted sum of modalities (one scalar weight per modality, renormalised per sample).

    pooled (B, D_m) per modality -> Linear+LayerNorm to (B, proj_dim) -> Z = sum_m w_m P_m with
    w = softmax over the sample's *present* modalities of learned logits (M,) -> MLP -> (B, out_dim).
    An absent modality gets weight exactly 0 and the others are renormalised, so a sample with only
    image present uses the image alone at full weight; a sample with nothing present feeds zeros to
    the MLP. The learned scalar-weighted sum of modality representations follows CentralNet
    (Vielzeuf et al. 2018, "CentralNet: a Multilayer Approach for Multimodal Fusion"), used once at
    the pooled level and softmax-normalised; the weights are input-independent, unlike ``attention``.

    Options: proj_dim (common width, 64), hidden (MLP hidden width, 0 = linear; 128), dropout (0.1).
    """

    def __init__(self, dims: dict[str, int], out_dim: int, proj_dim: int = 64, hidden: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        check_positive("weighted", proj_dim=proj_dim)
        self.project = nn.ModuleDict({m: projector(d, proj_dim) for m, d in self.dims.items()})
        # One logit per modality in sorted order; zeros = equal weights at initialisation.
        self.logits = nn.Parameter(torch.zeros(len(self.modalities)))
        self.mix = mlp(proj_dim, hidden, out_dim, dropout)

    def modality_weights(self, features: dict[str, Features]) -> Tensor:
        """(B, M) weights in sorted modality order: sum to 1 over present modalities, 0 for absent."""
        present = stack_presence(features, self.modalities)
        return masked_softmax(self.logits.expand(present.shape), present)

    def forward(self, features: dict[str, Features]) -> Tensor:
        self.check_inputs(features)
        weights = self.modality_weights(features)
        projected = torch.stack([self.project[m](present_pooled(features[m])) for m in self.modalities], dim=1)
        return self.mix((weights.unsqueeze(-1) * projected).sum(dim=1))


@FUSIONS.register("attention")
class AttentionFusion(Fusion):
    """Input-dependent attention over modalities: Z = sum_m alpha_m(x) P_m.

    pooled (B, D_m) per modality -> Linear+LayerNorm to P_m (B, proj_dim) -> score s_m = MLP(P_m)
    (one scorer shared by all modalities, Linear-tanh-Linear to a scalar) -> alpha = softmax of s over
    the sample's present modalities (B, M) -> Z = sum_m alpha_m P_m (B, proj_dim) -> MLP ->
    (B, out_dim). Absent modalities get alpha exactly 0 and never reach the scorer's softmax; a
    sample with nothing present feeds zeros to the MLP. This is modality-level attention as in Hori et al.
    2017 ("Attention-Based Multimodal Fusion for Video Description"), with their decoder-state query
    replaced by a learned additive (Bahdanau-style) scorer, so it works for any task.

    Options: proj_dim (64), score_hidden (scorer width, 32), hidden (MLP hidden, 0 = linear; 128),
    dropout (0.1). ``modality_weights(features)`` returns alpha for inspection.
    """

    def __init__(self, dims: dict[str, int], out_dim: int, proj_dim: int = 64, score_hidden: int = 32,
                 hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        check_positive("attention", proj_dim=proj_dim, score_hidden=score_hidden)
        self.project = nn.ModuleDict({m: projector(d, proj_dim) for m, d in self.dims.items()})
        # No bias on the last layer: softmax ignores a shift shared by all modalities, so such a
        # bias could never receive a gradient (a dead parameter).
        self.score = nn.Sequential(nn.Linear(proj_dim, score_hidden), nn.Tanh(),
                                   nn.Linear(score_hidden, 1, bias=False))
        self.mix = mlp(proj_dim, hidden, out_dim, dropout)

    def _project(self, features: dict[str, Features]) -> tuple[Tensor, Tensor]:
        projected = torch.stack([self.project[m](present_pooled(features[m])) for m in self.modalities], dim=1)
        present = stack_presence(features, self.modalities)
        return projected, present

    def _alpha(self, projected: Tensor, present: Tensor) -> Tensor:
        return masked_softmax(self.score(projected).squeeze(-1), present)

    def modality_weights(self, features: dict[str, Features]) -> Tensor:
        """(B, M) attention weights alpha in sorted modality order (0 for absent modalities)."""
        self.check_inputs(features)
        return self._alpha(*self._project(features))

    def forward(self, features: dict[str, Features]) -> Tensor:
        self.check_inputs(features)
        projected, present = self._project(features)
        alpha = self._alpha(projected, present)
        projected = torch.where(present.unsqueeze(-1), projected, torch.zeros((), dtype=projected.dtype,
                                                                               device=projected.device))
        return self.mix((alpha.unsqueeze(-1) * projected).sum(dim=1))


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """Gated Multimodal Unit (Arevalo et al. 2017, "Gated Multimodal Units for Information Fusion"),
    generalised from two to M modalities.

    As in the paper, the hidden states and the gates read different things: pooled x_m (B, D_m) ->
    h_m = tanh(LayerNorm(W_m x_m)) (B, proj_dim), while the gate logits W_z [x~_1; ...; x~_M]
    (B, M, proj_dim) read the *inputs* themselves, so a modality's weight can depend on raw
    evidence that its own tanh projection has squashed away. x~_m = x_m for a present modality and a
    learned per-modality "missing" embedding in input space (D_m) for an absent one, so the gate
    input is always defined and never holds an absent row's values (NaN included). Then per-feature
    gates z over modalities -> h = sum_m z_m * h_m (B, proj_dim) -> MLP -> (B, out_dim). The
    LayerNorm inside tanh is this library's addition (every fusion projects with Linear+LayerNorm).

    ``gate="softmax"`` (default) normalises the gates over the present modalities with a masked
    softmax; for two modalities that is exactly the GMU's z = sigmoid(W_z [x_1; x_2]) and 1 - z,
    with W_z the difference of the two modalities' gate rows. ``gate="sigmoid"`` is the paper's
    M-modality form, independent z_m = sigmoid(W_zm [x~]), renormalised to sum to 1 over the present
    modalities. Either way an absent modality's h_m gets gate 0 and a sample with nothing present
    feeds zeros to the MLP.

    Options: proj_dim (64), gate ("softmax" | "sigmoid"), hidden (MLP hidden, 0 = linear; 128),
    dropout (0.1). ``modality_weights(features)`` returns the gates (B, M, proj_dim).
    """

    def __init__(self, dims: dict[str, int], out_dim: int, proj_dim: int = 64,
                 gate: str = "softmax", hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        check_positive("gated", proj_dim=proj_dim)
        if gate not in ("softmax", "sigmoid"):
            raise ConfigError(f"gated: option 'gate' must be 'softmax' or 'sigmoid', got {gate!r}")
        self.gate_kind = gate
        self.proj_dim = proj_dim
        self.transform = nn.ModuleDict({m: projector(d, proj_dim) for m, d in self.dims.items()})
        # Stand-ins for absent inputs live in input space, because that is what the gate reads.
        self.missing = nn.ParameterDict({m: nn.Parameter(0.02 * torch.randn(d)) for m, d in self.dims.items()})
        n = len(self.modalities)
        self.gate = nn.Linear(sum(self.dims.values()), n * proj_dim)
        self.mix = mlp(proj_dim, hidden, out_dim, dropout)

    def _hidden_and_gates(self, features: dict[str, Features]) -> tuple[Tensor, Tensor, Tensor]:
        inputs = {m: present_pooled(features[m]) for m in self.modalities}  # absent rows already zero
        hidden = torch.stack([torch.tanh(self.transform[m](x)) for m, x in inputs.items()], dim=1)  # (B, M, P)
        present = stack_presence(features, self.modalities)
        keep = present.unsqueeze(-1)
        gate_in = torch.cat([torch.where(features[m].present[:, None], x, self.missing[m].to(x.dtype))
                             for m, x in inputs.items()], dim=-1)  # (B, sum D_m)
        logits = self.gate(gate_in).view(hidden.shape)
        if self.gate_kind == "softmax":
            gates = masked_softmax(logits, present)
        else:
            zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
            raw = torch.where(keep, torch.sigmoid(logits), zero)
            gates = raw / raw.sum(dim=1, keepdim=True).clamp(min=torch.finfo(raw.dtype).tiny)
        hidden = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        return hidden, gates, present

    def modality_weights(self, features: dict[str, Features]) -> Tensor:
        """(B, M, proj_dim) gates in sorted modality order: per feature they sum to 1 over present
        modalities and are 0 for absent ones (all 0 for a sample with nothing present)."""
        self.check_inputs(features)
        return self._hidden_and_gates(features)[1]

    def forward(self, features: dict[str, Features]) -> Tensor:
        self.check_inputs(features)
        hidden, gates, _ = self._hidden_and_gates(features)
        return self.mix((gates * hidden).sum(dim=1))
