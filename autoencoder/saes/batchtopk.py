"""BatchTopK SAE: Bussmann et al. 2024, "BatchTopK Sparse Autoencoders" (arXiv 2412.06410).

Training keeps the k·B largest ReLU'd pre-activations of the whole batch of B rows, so a row's L0
varies while the batch mean is k; AuxK as TopK (`autoencoder.saes.topk`). Inference replaces the
batch top-k by one threshold θ: f = ReLU(pre) · (pre > θ), a JumpReLU with the same θ for every
feature, which is how the folder exports (SAELens "jumprelu", `threshold` = θ everywhere).

θ is a running average of the smallest kept activation of each training batch, as in the paper,
SAELens (`topk_threshold_lr` 0.01, from 0) and dictionary_learning (β 0.999 from step 1,000, first
value taken as is). Here: rate `sae.threshold_rate` (0.01) from the first step, the first value
taken as is, so a short run's estimate does not start from 0. Until the first update encode() uses
the batch top-k. Under DDP each rank picks its own k·B_rank and θ is averaged over the ranks' minima.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from autoencoder.saes.base import LossTerms, SAEModelConfig
from autoencoder.saes.topk import TopKSAE
from tools.core.config import UserError


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The k·rows largest entries of ReLU(pre) over the whole batch kept, the rest zero (2-D pre)."""
    flat = pre.reshape(-1)
    n = min(k * pre.shape[0], flat.numel())
    vals, idx = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, F.relu(vals)).view_as(pre)


class BatchTopKSAE(TopKSAE):
    """Batch top-k in training, a learned global threshold at inference."""

    name, saelens = "batchtopk", "jumprelu"
    batch_select = True
    threshold: torch.Tensor

    def __init__(self, cfg: SAEModelConfig, kernel: str = "dense"):
        super().__init__(cfg, kernel=kernel)
        # < 0: not estimated yet (encode() falls back to the batch top-k)
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float64))
        self.batch_sum = None

    @classmethod
    def check_model(cls, cfg: SAEModelConfig) -> None:
        super().check_model(cfg)
        if not 0 < cfg.threshold_rate <= 1:
            raise UserError(f"config `sae.threshold_rate`={cfg.threshold_rate}: expected a rate in (0, 1]")

    @classmethod
    def check_train(cls, c) -> None:
        super().check_train(c)
        if not 0 < c.threshold_rate <= 1:
            raise UserError(f"config `sae.threshold_rate`={c.threshold_rate}: expected a rate in (0, 1]")

    @classmethod
    def model_fields(cls, c) -> dict[str, Any]:
        return {"k": c.k, "threshold_rate": c.threshold_rate}

    def state_names(self) -> tuple[str, ...]:
        return self.param_names() + ("threshold",)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return batch_topk(pre, self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        if float(self.threshold) < 0:
            return batch_topk(pre.reshape(-1, pre.shape[-1]), self.cfg.k).view_as(pre)
        return F.relu(pre) * (pre > self.threshold.to(pre.dtype))

    def loss(self, x: torch.Tensor, **kw: Any) -> LossTerms:
        t = super().loss(x, **kw)
        self.update_threshold(t.min_positive(), kw.get("batch_sum"))
        return t

    @torch.no_grad()
    def update_threshold(self, m: torch.Tensor, batch_sum=None) -> None:
        """θ ← (1 − r) θ + r · m, the first one as is; `m`: the smallest positive activation of this
        batch (+inf when nothing fired: no update)."""
        has = torch.isfinite(m)
        stats = torch.stack([torch.where(has, m, torch.zeros_like(m)).double(), has.double()])
        if batch_sum is not None:
            stats = batch_sum(stats)
        if float(stats[1]) == 0:
            return
        m = stats[0] / stats[1]
        r = self.cfg.threshold_rate
        self.threshold.copy_(m if float(self.threshold) < 0 else (1 - r) * self.threshold + r * m)

    # ---- export: a JumpReLU with θ for every feature ------------------------------------------
    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = super().export_tensors()
        theta = max(float(self.threshold), 0.0)
        out["threshold"] = torch.full((self.cfg.d_sae,), theta, dtype=out["b_enc"].dtype)
        return out

    def export_cfg(self) -> dict[str, Any]:
        return {"activation_fn_str": "relu", "activation_fn_kwargs": {}, "k": self.cfg.k}

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.param_names():
                getattr(self, n).copy_(state[n].float())
            self.threshold.fill_(float(state["threshold"].reshape(-1)[0]))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().expected_shapes(), "threshold": (self.cfg.d_sae,)}
