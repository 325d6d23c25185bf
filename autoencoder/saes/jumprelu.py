"""JumpReLU SAE: Rajamanoharan et al. 2024, "Jumping Ahead" (arXiv 2407.14435); every Gemma Scope SAE.

    pre = x̄ W_enc + b_enc;  f = pre · H(pre − θ)  (θ > 0 learned per feature);  x̂ = f W_dec + b_dec
    loss = mean over the batch of ‖x − x̂‖² / mse_scale + l0_coeff · ‖f‖₀

H has no useful derivative, so θ learns through straight-through estimators with a rectangle
kernel K of width ε (`bandwidth`): ∂f/∂θ = −(θ/ε) K((pre − θ)/ε) and ∂‖f‖₀/∂θ = −(1/ε) K(...); the
pre-activations get H(pre − θ) from f and nothing from the L0 term (the paper's "step" loss, as
DeepMind's and SAELens' `jumprelu_ste_to_input=False`).

Departures: θ is a direct parameter (as SAELens and dictionary_learning; the paper trains log θ),
kept >= 0 by projection after each step. Decoder rows are kept at unit norm (Gemma Scope does too;
the paper's recipe instead penalises L0 only and leaves the norm free). Gemma Scope normalises the
inputs to unit mean squared norm and uses ε = θ₀ = 0.001 there; here `bandwidth` and
`threshold_init` are in units of s = RMS ‖x − b_dec‖ of the init sample (the trainer's loss scale,
1 when `sae.normalize_loss=false`), the same thing without rescaling the data. The sparse kernel is
not used: θ's gradient needs ∂L/∂f at every pair near the threshold, not only the active ones.
Anthropic's tanh sparsity loss and pre-activation loss (2025) are not implemented.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoencoder.saes.base import SAE, LossTerms, SAEModelConfig, row_sq_error, short_float
from tools.core.config import UserError


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """f = pre · H(pre − θ), with the straight-through gradient −(θ/ε) K((pre − θ)/ε) for θ."""

    @staticmethod
    def forward(ctx, pre, theta, eps):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = (-(theta / eps) * _rect((pre - theta) / eps) * g).sum(0)
        return (pre > theta).to(g.dtype) * g, g_theta, None


class StepFn(torch.autograd.Function):
    """H(pre − θ), with the straight-through gradient −(1/ε) K((pre − θ)/ε) for θ (none for pre)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        return None, (-(1.0 / eps) * _rect((pre - theta) / eps) * g).sum(0), None


class JumpReLUSAE(SAE):
    """A learned threshold per feature, trained with an L0 penalty through straight-through estimators."""

    name, saelens, coeff_field = "jumprelu", "jumprelu", "l0_coeff"
    sparsity_log_key = "losses/l0_loss"

    def __init__(self, cfg: SAEModelConfig, kernel: str = "dense"):
        self.unit = 1.0
        super().__init__(cfg, kernel=kernel)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if not hasattr(self, "threshold"):
            self.threshold = nn.Parameter(torch.empty(self.cfg.d_sae))
        with torch.no_grad():
            self.threshold.fill_(self.cfg.threshold_init * self.unit)

    @classmethod
    def check_model(cls, cfg: SAEModelConfig) -> None:
        for key in ("bandwidth", "threshold_init"):
            if not getattr(cfg, key) > 0:
                raise UserError(f"config `sae.{key}`={getattr(cfg, key)}: expected a number > 0")

    @classmethod
    def check_train(cls, c) -> None:
        for key in ("bandwidth", "threshold_init", "l0_coeff"):
            if not getattr(c, key) > 0:
                raise UserError(f"config `sae.{key}`={getattr(c, key)}: expected a number > 0")

    @classmethod
    def model_fields(cls, c) -> dict[str, Any]:
        return {"bandwidth": c.bandwidth, "threshold_init": c.threshold_init}

    @classmethod
    def name_tag(cls, c) -> tuple[str, set[str]]:
        return f"l0c{short_float(c.l0_coeff)}", {"l0_coeff"}

    def extra_params(self) -> tuple[str, ...]:
        return ("threshold",)

    def set_scale(self, s: float) -> None:
        """Bandwidth and threshold units: s = the input's RMS norm (see the module docstring)."""
        self.unit = float(s)

    @torch.no_grad()
    def init_scale(self, s: float) -> None:
        """θ at `threshold_init` in units of s, once, before training."""
        self.set_scale(s)
        self.threshold.fill_(self.cfg.threshold_init * self.unit)
        self.threshold.clamp_(min=0.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return F.relu(pre) * (pre > self.threshold.to(pre.dtype))  # SAELens' JumpReLUSAE.encode

    def loss(self, x: torch.Tensor, *, target: torch.Tensor | None = None, l0_coeff: float = 0.0,
             mse_reduction: str = "sum", mse_scale: float = 1.0, **_: Any) -> LossTerms:
        y = x if target is None else target
        pre = self.pre_acts(x)
        eps = self.cfg.bandwidth * self.unit
        theta = self.threshold.to(pre.dtype)
        f = JumpReLUFn.apply(pre, theta, eps)
        x_hat = self.reconstruct(x, f)
        mse = row_sq_error(y, x_hat, mse_reduction).mean()
        l0 = StepFn.apply(pre, theta, eps).sum(-1, dtype=torch.float32).mean()
        return LossTerms(x_hat=x_hat, f=f, mse=mse, sparsity=l0, overall=mse / mse_scale + l0_coeff * l0)

    def row_loss(self, x: torch.Tensor, y: torch.Tensor, *, coeff: float, mse_reduction: str,
                 mse_scale: float, l1_scale: float) -> torch.Tensor:
        f = self.encode(x)
        return row_sq_error(y, self.reconstruct(x, f), mse_reduction) / mse_scale + coeff * (f > 0).sum(-1)

    @torch.no_grad()
    def after_step(self) -> None:
        self.threshold.clamp_(min=0.0)

    def export_cfg(self) -> dict[str, Any]:
        return {"activation_fn_str": "relu", "activation_fn_kwargs": {}}
