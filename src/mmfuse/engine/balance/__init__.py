"""Modality-imbalance remedies, chosen by ``trainer.balance`` (options: ``trainer.balance_options``).

* ``ogm_ge``: On-the-fly Gradient Modulation + Generalization Enhancement (Peng et al., CVPR 2022)
* ``grad_blend``: Gradient-Blending loss weights (Wang, Tran & Feiszli, CVPR 2020)
* ``agm``: Adaptive Gradient Modulation with Shapley responses (Li et al., ICCV 2023)

Each module's docstring gives its paper's equations and the choices our generic fusion forced.
"""

from __future__ import annotations

from mmfuse.config import TrainerConfig
from mmfuse.config.balance import AGMOptions, GradBlendOptions, OGMGEOptions, balance_options
from mmfuse.engine.balance.agm import AGM
from mmfuse.engine.balance.base import BalanceMethod, BalanceStep
from mmfuse.engine.balance.grad_blend import GradBlend
from mmfuse.engine.balance.ogm_ge import OGMGE
from mmfuse.model import MultimodalModel

__all__ = ["AGM", "OGMGE", "BalanceMethod", "BalanceStep", "GradBlend", "build_balance"]


def build_balance(trainer: TrainerConfig, model: MultimodalModel) -> BalanceMethod | None:
    """The remedy ``trainer.balance`` names, built for ``model`` (None for 'none')."""
    options = balance_options(trainer.balance, trainer.balance_options)
    if isinstance(options, OGMGEOptions):
        return OGMGE(model, options)
    if isinstance(options, GradBlendOptions):
        return GradBlend(model, options)
    if isinstance(options, AGMOptions):
        return AGM(model, options)
    return None
