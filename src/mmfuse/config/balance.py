"""Options of the modality-imbalance remedies (``trainer.balance`` / ``trainer.balance_options``).

They live in the config layer so a bad option is an error when the YAML is loaded, naming the key
and the method, not a failure after the data work. The remedies themselves are in
``mmfuse.engine.balance``; their docstrings give the papers and the equations.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mmfuse.config.strict import StrictModel

BalanceName = Literal["none", "ogm_ge", "grad_blend", "agm"]


class OGMGEOptions(StrictModel):
    """On-the-fly Gradient Modulation with Generalization Enhancement (Peng et al., CVPR 2022)."""

    alpha: float = Field(0.5, gt=0, description="strength: k = 1 - tanh(alpha * relu(rho - 1))")
    noise: bool = Field(True, description="Generalization Enhancement: add N(0, std(grad)) to encoder gradients")
    start_epoch: int = Field(0, ge=0, description="first epoch (0-based) that is modulated")
    end_epoch: int | None = Field(None, ge=0, description="last epoch that is modulated; null = all")

    @model_validator(mode="after")
    def _window(self) -> OGMGEOptions:
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch {self.end_epoch} is before start_epoch {self.start_epoch}")
        return self


class GradBlendOptions(StrictModel):
    """Gradient-Blending (Wang, Tran & Feiszli, CVPR 2020)."""

    every_n_epochs: int = Field(1, gt=0, description="re-estimate the weights every N epochs (a super-epoch)")
    eps: float = Field(1e-8, gt=0, description="floor of the overfitting delta squared (no division by zero)")


class AGMOptions(StrictModel):
    """Adaptive Gradient Modulation (Li et al., ICCV 2023)."""

    alpha: float = Field(1.0, gt=0, description="strength: coeff = exp(alpha * min(ratio* - ratio, clip))")
    clip: float = Field(7.0, gt=0, description="upper bound of ratio* - ratio in the exponent (the authors' 7)")
    max_modalities: int = Field(6, gt=1, description="Shapley values need 2^M masked passes: refuse more modalities")


BALANCE_OPTIONS: dict[str, type[StrictModel]] = {
    "ogm_ge": OGMGEOptions, "grad_blend": GradBlendOptions, "agm": AGMOptions,
}


def balance_options(name: str, options: dict[str, Any]) -> StrictModel | None:
    """The typed options of remedy ``name`` (None for 'none'); ValueError naming the bad key."""
    if name == "none":
        if options:
            raise ValueError(f"trainer.balance_options {sorted(options)} given but trainer.balance is 'none'")
        return None
    try:
        return BALANCE_OPTIONS[name].model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(_problem(e["loc"], e["msg"]) for e in exc.errors())
        raise ValueError(f"trainer.balance_options for '{name}': {problems}") from None


def _problem(loc: tuple[Any, ...], message: str) -> str:
    """'key: message' (the message alone for the options as a whole), without pydantic's 'Value error, '."""
    message = message.removeprefix("Value error, ")
    where = ".".join(str(p) for p in loc)
    return f"{where}: {message}" if where else message
