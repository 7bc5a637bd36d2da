"""Tensor-product fusion: TFN and its low-rank factorisation LMF."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.layers import mlp
from mmfuse.core.masking import MissingEmbedding, present_pooled
from mmfuse.core.registry import FUSIONS
from mmfuse.fusion.base import Fusion, projector


def append_one(x: Tensor) -> Tensor:
    """[x; 1] along the last dim: the constant 1 keeps every lower-order (uni- and bi-modal) term."""
    return torch.cat([x, torch.ones((*x.shape[:-1], 1), dtype=x.dtype, device=x.device)], dim=-1)


@FUSIONS.register("tfn")
class TensorFusion(Fusion):
    """Tensor Fusion Network (Zadeh et al. 2017, "Tensor Fusion Network for Multimodal Sentiment
    Analysis").

    pooled (B, D_m) per modality -> per-modality embedding sub-network to z_m (B, rank_dim)
    (Linear+LayerNorm+GELU to proj_dim, then Linear+LayerNorm to rank_dim; with proj_dim=0 a single
    Linear+LayerNorm) -> [z_m; 1] -> outer product over all modalities in sorted order, flattened to
    (B, prod_m (rank_dim + 1)) -> Dropout + MLP -> (B, out_dim). The appended 1 makes the product
    hold every unimodal, bimodal, ... and the full M-modal interaction term.

    An absent modality's z_m is replaced by a learned per-modality "missing" embedding; thanks to the
    appended 1 the other modalities' lower-order terms are kept intact. The product grows as
    (rank_dim + 1)^M, so a size above ``max_product`` is a ConfigError asking for a smaller rank_dim.

    Options: rank_dim (8: (8+1)^3 = 729 for three modalities), proj_dim (sub-network width, 32),
    hidden (MLP hidden, 0 = linear; 128), dropout (0.1), max_product (100_000).
    """

    def __init__(self, dims: dict[str, int], out_dim: int, rank_dim: int = 8, proj_dim: int = 32,
                 hidden: int = 128, dropout: float = 0.1, max_product: int = 100_000) -> None:
        super().__init__(dims, out_dim)
        if rank_dim <= 0:
            raise ConfigError(f"tfn: option 'rank_dim' must be > 0, got {rank_dim}")
        if proj_dim < 0:
            raise ConfigError(f"tfn: option 'proj_dim' must be >= 0, got {proj_dim}")
        n = len(self.modalities)
        self.product_dim = (rank_dim + 1) ** n
        if self.product_dim > max_product:
            fits = max(1, math.floor(max_product ** (1.0 / n) + 1e-9) - 1)
            while (fits + 1) ** n > max_product and fits > 1:
                fits -= 1
            raise ConfigError(
                f"tfn: the tensor product of {n} modalities with rank_dim={rank_dim} has "
                f"({rank_dim}+1)^{n} = {self.product_dim:,} entries, above max_product={max_product:,}; "
                f"lower fusion.rank_dim (rank_dim={fits} fits), or raise fusion.max_product"
            )
        self.rank_dim = rank_dim

        def subnet(d: int) -> nn.Module:
            if proj_dim == 0:
                return projector(d, rank_dim)
            return nn.Sequential(projector(d, proj_dim), nn.GELU(), projector(proj_dim, rank_dim))

        self.project = nn.ModuleDict({m: subnet(d) for m, d in self.dims.items()})
        self.missing = MissingEmbedding(self.modalities, rank_dim)
        self.mix = nn.Sequential(nn.Dropout(dropout), mlp(self.product_dim, hidden, out_dim, dropout))

    def tensor_product(self, features: dict[str, Features]) -> Tensor:
        """(B, prod_m (rank_dim + 1)) flattened outer product of [z_m; 1] in sorted modality order."""
        self.check_inputs(features)
        product: Tensor | None = None
        for m in self.modalities:
            f = features[m]
            z = self.project[m](present_pooled(f))
            z = append_one(self.missing(m, z, f.present))
            product = z if product is None else (product.unsqueeze(-1) * z.unsqueeze(1)).flatten(1)
        assert product is not None  # at least one modality, checked in Fusion.__init__
        return product

    def forward(self, features: dict[str, Features]) -> Tensor:
        return self.mix(self.tensor_product(features))


@FUSIONS.register("lmf")
class LowRankFusion(Fusion):
    """Low-rank Multimodal Fusion (Liu et al. 2018, "Efficient Low-rank Multimodal Fusion with
    Modality-Specific Factors").

    pooled (B, D_m) per modality -> Linear+LayerNorm to p_m (B, proj_dim) -> [p_m; 1] ->
    per-modality factors W_m (rank, proj_dim + 1, F) give f_m = [p_m; 1] @ W_m (rank, B, F) ->
    h = sum_r w_r prod_m f_m[r] + b (B, F). This equals TFN's outer product followed by a linear layer
    whose weight tensor has rank ``rank``, without ever forming the product. With hidden = 0 (the
    default, as in the paper) F = out_dim and h is the output; with hidden > 0, F = hidden and h goes
    through GELU-Dropout-Linear to out_dim (the low-rank layer is the first layer of TFN's MLP).

    The factors are registered parameters (an ``nn.ParameterDict``, one per modality), unlike
    MultiBench's LowRankTensorFusion whose factors live in a Python list and never train.
    An absent modality's p_m is replaced by a learned per-modality "missing" embedding.

    Options: rank (4), proj_dim (32), hidden (0), dropout (0.1).
    """

    def __init__(self, dims: dict[str, int], out_dim: int, rank: int = 4, proj_dim: int = 32, hidden: int = 0,
                 dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        for key, value in (("rank", rank), ("proj_dim", proj_dim)):
            if value <= 0:
                raise ConfigError(f"lmf: option '{key}' must be > 0, got {value}")
        self.rank = rank
        fused = hidden if hidden > 0 else out_dim
        self.project = nn.ModuleDict({m: projector(d, proj_dim) for m, d in self.dims.items()})
        self.missing = MissingEmbedding(self.modalities, proj_dim)
        # Each factor maps a unit-scale [p; 1] to unit-scale outputs, so the product over M
        # modalities neither vanishes nor explodes at initialisation (xavier on the 3-d tensor, as in
        # the reference code, gives ~0.1 per factor and ~0.1^M after the product).
        self.factors = nn.ParameterDict({
            m: nn.Parameter(torch.randn(rank, proj_dim + 1, fused) / math.sqrt(proj_dim + 1)) for m in self.modalities
        })
        self.fusion_weights = nn.Parameter(torch.randn(rank) / math.sqrt(rank))
        self.fusion_bias = nn.Parameter(torch.zeros(fused))
        self.out: nn.Module = (nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
                               if hidden > 0 else nn.Identity())

    def forward(self, features: dict[str, Features]) -> Tensor:
        self.check_inputs(features)
        product: Tensor | None = None
        for m in self.modalities:
            f = features[m]
            p = self.project[m](present_pooled(f))
            p = append_one(self.missing(m, p, f.present))
            factor = torch.einsum("bd,rdf->rbf", p, self.factors[m])
            product = factor if product is None else product * factor
        assert product is not None  # at least one modality, checked in Fusion.__init__
        fused = torch.einsum("r,rbf->bf", self.fusion_weights, product) + self.fusion_bias
        return self.out(fused)
