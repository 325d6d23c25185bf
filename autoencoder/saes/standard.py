"""The L1 SAE ("standard" in SAELens): Anthropic's "Towards Monosemanticity" (2023).

    x̄ = x − b_dec;  f = ReLU(x̄ W_enc + b_enc);  x̂ = f W_dec + b_dec
    loss = mean over the batch of ‖x − x̂‖² / mse_scale + λ ‖f‖₁ / l1_scale

Departures from the paper: the loss may be divided by the input's scale (`mse_scale`, `l1_scale`,
both 1 by default: the paper's raw loss), so λ means the same at any activation scale; decoder rows
are kept at unit norm with the parallel gradient removed (the paper's recipe too). Dead features
are re-initialised by neuron resampling (`autoencoder.resample`), not by an auxiliary loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from autoencoder.saes.base import SAE, LossTerms, row_sq_error
from tools.core.config import UserError


class L1SAE(SAE):
    """Anthropic 2023: ReLU encoder, L1 penalty on the feature activations.

    `kernel` selects the training forward: "dense" (PyTorch autograd, the reference), "sparse"
    (`autoencoder.kernels.sparse_sae_forward` forced onto its sparse path, which exploits the
    ReLU's zeros), or "auto" (the kernel picks sparse or dense GEMMs per batch from the measured
    density; plain autograd on CUDA). `encode`/`forward` (inference) are always the dense formula.
    """

    name, saelens, coeff_field = "l1", "standard", "l1_coeff"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """pre -> f for the sparse kernel: kept values as they are, zeros elsewhere."""
        return F.relu(pre) if torch.is_grad_enabled() else pre.relu_()

    def _sparse_forward(self):
        """The kernel's function when selected and available, else None (dense path)."""
        if self.kernel == "dense":
            return None
        try:
            from autoencoder.kernels import sparse_sae_forward
        except ImportError as e:
            if self.kernel == "sparse":
                raise UserError(f"sae.kernel=sparse but autoencoder.kernels is unavailable ({e})") from e
            return None
        mode = "sparse" if self.kernel == "sparse" else "auto"
        return lambda x, *params: sparse_sae_forward(x, *params, mode=mode, activation=self.activation,
                                                     center=not self.transcoder)

    def train_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, f) for training: the fast kernel when chosen, numerically the dense formula."""
        fn = self._sparse_forward()
        if fn is not None and x.dim() == 2:
            x_hat, f = fn(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        else:
            f = self.encode(x)
            x_hat = self.decode(f)
        s = self.skip_out(x)
        return (x_hat if s is None else x_hat + s), f

    def loss(self, x: torch.Tensor, *, target: torch.Tensor | None = None, l1_coeff: float = 0.0,
             mse_reduction: str = "sum", mse_scale: float = 1.0, l1_scale: float = 1.0,
             **_: Any) -> LossTerms:
        y = x if target is None else target
        x_hat, f = self.train_forward(x)
        mse = row_sq_error(y, x_hat, mse_reduction).mean()
        l1 = f.sum(-1, dtype=torch.float32).mean()  # f >= 0 (ReLU), so this is ‖f‖₁
        overall = mse / mse_scale + l1_coeff * l1 / l1_scale
        return LossTerms(x_hat=x_hat, f=f, mse=mse, sparsity=l1, overall=overall)

    def row_loss(self, x: torch.Tensor, y: torch.Tensor, *, coeff: float, mse_reduction: str,
                 mse_scale: float, l1_scale: float) -> torch.Tensor:
        f = self.encode(x)
        mse = row_sq_error(y, self.reconstruct(x, f), mse_reduction) / mse_scale
        return mse + coeff * f.float().sum(-1) / l1_scale
