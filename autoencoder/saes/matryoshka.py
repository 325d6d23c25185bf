"""Matryoshka BatchTopK SAE: Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders" (arXiv 2503.17547).

The encoder is BatchTopK's (`autoencoder.saes.batchtopk`, same inference threshold and export as a
JumpReLU); the loss sums the reconstruction errors of nested prefixes of the dictionary:

    x̂_m = b_dec + Σ_{i < w_m} f_i W_dec[i]   for the widths w_1 < ... < w_M = n_features
    loss = Σ_m mean over the batch of ‖x − x̂_m‖² / mse_scale + aux_coeff · AuxK(x − x̂_M)

so the first features must reconstruct on their own and stay general. Departures: the prefix
losses are summed, as in the paper (dictionary_learning averages them, i.e. divides by M: the same
optimum at another learning rate); the widths are fixed (no random prefix sampling); `mse` (the
logged and evaluated figure) is the full dictionary's. The sparse kernel is not used (each prefix
needs its own reconstruction's gradient).
"""

from __future__ import annotations

from typing import Any

import torch

from autoencoder.saes.base import LossTerms, SAEModelConfig, min_positive, row_sq_error
from autoencoder.saes.batchtopk import BatchTopKSAE
from tools.core.config import UserError


def check_widths(widths: Any, n_features: int) -> list[int]:
    """`widths` as a list of increasing positive ints ending at n_features, else a UserError."""
    ok = (isinstance(widths, list | tuple) and len(widths) > 0
          and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)
          and all(a < b for a, b in zip(widths, widths[1:], strict=False)) and widths[-1] == n_features)
    if not ok:
        raise UserError(f"config `sae.matryoshka_widths`={list(widths) if widths else widths}: expected "
                        f"increasing widths >= 1 ending at sae.n_features={n_features}")
    return list(widths)


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose loss is the sum of its nested prefixes' reconstruction losses."""

    name = "matryoshka"

    @classmethod
    def check_model(cls, cfg: SAEModelConfig) -> None:
        super().check_model(cfg)
        check_widths(cfg.widths, cfg.d_sae)

    @classmethod
    def check_train(cls, c) -> None:
        super().check_train(c)
        check_widths(c.widths(), c.n_features)

    @classmethod
    def model_fields(cls, c) -> dict[str, Any]:
        return {**super().model_fields(c), "widths": c.widths()}

    def prefix_reconstructions(self, x: torch.Tensor, f: torch.Tensor) -> list[torch.Tensor]:
        """x̂_m for every width (the last one is the full reconstruction, skip path included)."""
        out, acc, start = [], self.b_dec + (self.skip_out(x) if self.cfg.skip else 0), 0
        for w in self.cfg.widths:
            acc = acc + f[:, start:w] @ self.W_dec[start:w]
            out.append(acc)
            start = w
        return out

    def loss(self, x: torch.Tensor, *, target: torch.Tensor | None = None,
             dead_mask: torch.Tensor | None = None, aux_k: int | None = None, aux_coeff: float = 1 / 32,
             mse_reduction: str = "sum", mse_scale: float = 1.0, batch_sum=None, **_: Any) -> LossTerms:
        y = x if target is None else target
        pre = self.pre_acts(x)
        f = self.activation(pre)
        recs = self.prefix_reconstructions(x, f)
        mses = [row_sq_error(y, r, mse_reduction).mean() for r in recs]
        x_hat = recs[-1]
        aux = self.aux_loss(x, y, x_hat, pre, dead_mask, aux_k, batch_sum)
        self.update_threshold(min_positive(f), batch_sum)
        extra = {f"mse_prefix_{w}": m.detach() for w, m in zip(self.cfg.widths, mses, strict=True)}
        return LossTerms(x_hat=x_hat, f=f, mse=mses[-1], sparsity=aux,
                         overall=torch.stack(mses).sum() / mse_scale + aux_coeff * aux, extra=extra)
