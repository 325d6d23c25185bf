"""The TopK SAE ("topk" in SAELens): Gao et al. 2024, "Scaling and evaluating sparse autoencoders".

    f = ReLU(TopK_k(x̄ W_enc + b_enc)),  x̄ = x − b_dec;  x̂ = f W_dec + b_dec
    loss = mean over the batch of ‖x − x̂‖² / mse_scale + aux_coeff · AuxK

AuxK reconstructs the residual from the top `aux_k` dead latents (those silent for `sae.aux_dead_tokens`,
default `sae.dead_tokens`, rows) so they keep receiving gradient. Departures from openai/sparse_autoencoder:
decoder rows are renormalised to unit norm after every step (the paper does the same; SAELens
does not) and AuxK is scaled down when fewer than `aux_k` latents are dead (as SAELens does).
`sae.decoder_lr_scale` steps the decoder at a multiple of lr: SAELens's decoder starts at norm 0.1
and turns that much faster under Adam, which is what its lead at low k came from. The k-sparse
config groups (conf/sae/topk.yaml, ...) set it to 3 and AuxK's weight to 1/8 (Gao et al.: 1/32);
measured at k 16-64 on the demo shards (docs/sae-training.md, the architecture frontier).
With the sparse kernel the main forward/backward runs on the k active pairs per row
(`autoencoder.kernels.ksparse_sae_forward`: no dense f is built), as openai's and EleutherAI's
sparsify's kernels do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from autoencoder.saes.base import SAE, BatchSum, LossTerms, SAEModelConfig, row_sq_error
from autoencoder.saes.standard import L1SAE
from tools.core.config import UserError


class TopKSAE(L1SAE):
    """Gao et al. 2024: z = ReLU(TopK(x̄ W_enc + b_enc)), with the AuxK loss for dead latents."""

    name, saelens, coeff_field = "topk", "topk", None
    sparsity_log_key = "losses/auxiliary_reconstruction_loss"
    uses_dead_mask = k_sparse = True

    @classmethod
    def check_model(cls, cfg: SAEModelConfig) -> None:
        if cfg.k is None or not 1 <= cfg.k <= cfg.d_sae:
            raise UserError(f"{cfg.architecture} SAE needs 1 <= k <= n_features, got k={cfg.k}, "
                            f"n_features={cfg.d_sae}")

    @classmethod
    def check_train(cls, c) -> None:
        if not 1 <= c.k <= c.n_features:
            raise UserError(f"config `sae.k`={c.k}: expected 1 <= k <= sae.n_features={c.n_features}")

    @classmethod
    def model_fields(cls, c) -> dict[str, Any]:
        return {"k": c.k}

    @classmethod
    def name_tag(cls, c) -> tuple[str, set[str]]:
        return f"k{c.k}", {"k"}

    def topk_pre(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.topk_pre(pre, self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.topk_pre(self.pre_acts(x), self.cfg.k)

    batch_select = False  # BatchTopK: the k·B largest of the whole batch instead of k per row

    def ksparse_kernel(self, x: torch.Tensor) -> bool:
        """Whether the k-sparse kernel (`autoencoder.kernels.ksparse_sae_forward`) runs this batch:
        always with `kernel=sparse`; with `auto` where `sparse_benefit` expects it to pay."""
        if self.kernel == "dense" or x.dim() != 2:
            return False
        from autoencoder.kernels import sparse_benefit

        return self.kernel == "sparse" or sparse_benefit(self.cfg.k, self.cfg.d_sae, x.device)

    def main_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                     Any]:
        """(x_hat, f, pre, codes): on the k-sparse kernel f and pre are None (the codes hold the
        active pairs; AuxK recomputes the dead latents' pre-activations), else the dense formula
        (or the L1 kernel's fused path) and codes is None."""
        if self.ksparse_kernel(x):
            from autoencoder.kernels import ksparse_sae_forward

            x_hat, codes = ksparse_sae_forward(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.cfg.k,
                                               batch=self.batch_select, center=not self.transcoder)
            s = self.skip_out(x)
            return (x_hat if s is None else x_hat + s), None, None, codes
        if self._sparse_forward() is not None and x.dim() == 2:
            x_hat, f = self.train_forward(x)
            return x_hat, f, None, None
        pre = self.pre_acts(x)
        f = self.activation(pre)
        return self.reconstruct(x, f), f, pre, None

    def loss(self, x: torch.Tensor, *, target: torch.Tensor | None = None,
             dead_mask: torch.Tensor | None = None, aux_k: int | None = None,
             aux_coeff: float = 1 / 32, mse_reduction: str = "sum", mse_scale: float = 1.0,
             batch_sum: BatchSum | None = None, **_: Any) -> LossTerms:
        y = x if target is None else target
        x_hat, f, pre, codes = self.main_forward(x)
        mse = row_sq_error(y, x_hat, mse_reduction).mean()
        aux = self.aux_loss(x, y, x_hat, pre, dead_mask, aux_k, batch_sum)
        return LossTerms(x_hat=x_hat, f=f, mse=mse, sparsity=aux,
                         overall=mse / mse_scale + aux_coeff * aux, codes=codes)

    def row_loss(self, x: torch.Tensor, y: torch.Tensor, *, coeff: float, mse_reduction: str,
                 mse_scale: float, l1_scale: float) -> torch.Tensor:
        return SAE.row_loss(self, x, y, coeff=coeff, mse_reduction=mse_reduction, mse_scale=mse_scale,
                            l1_scale=l1_scale)

    def aux_loss(self, x: torch.Tensor, y: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor | None,
                 dead_mask: torch.Tensor | None, aux_k: int | None,
                 batch_sum: BatchSum | None = None) -> torch.Tensor:
        """AuxK: the top `aux_k` dead latents reconstruct the main residual e = y − x̂ (no b_dec),
        as a normalised MSE: Σ‖e − ê‖² over the batch divided by Σ‖e − ē‖², the error of
        predicting the batch mean ē (Gao et al. 2024, `normalized_mse` in openai/sparse_autoencoder),
        so 1.0 is no better than the mean; scaled down when fewer than `aux_k` latents are dead
        (as SAELens does). Dimensionless, so mse_reduction does not enter. Under DDP `batch_sum`
        all-reduces the denominator's statistics, so each rank's term is its share of the global
        batch's normalised MSE (times the world size, undone by the gradient average). Without
        `pre` (the sparse kernel ran) only the dead latents' pre-activations are computed."""
        zero = x.new_zeros((), dtype=torch.float32)
        if dead_mask is None or aux_k is None or aux_k < 1:
            return zero
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return zero
        k = min(aux_k, n_dead)
        if pre is None:
            idx = dead_mask.nonzero().squeeze(1)
            z = self.topk_pre(self.sae_in(x) @ self.W_enc[:, idx] + self.b_enc[idx], k)
            e_hat = z @ self.W_dec[idx]
        else:
            masked = torch.where(dead_mask, pre, torch.full_like(pre, -math.inf))
            e_hat = self.topk_pre(masked, k) @ self.W_dec
        e = (y - x_hat).detach().float()
        num = (e_hat.float() - e).pow(2).sum()
        n = e.shape[0]
        stats = torch.cat([e.new_tensor([n, e.pow(2).sum()]), e.sum(0)])  # N, Σ‖e‖², Σe
        total = batch_sum(stats) if batch_sum is not None else stats
        den = (total[1] - total[2:].pow(2).sum() / total[0]).clamp_min(1e-12)  # Σ‖e − ē‖²
        return num * (total[0] / n) / den * min(n_dead / aux_k, 1.0)

    def export_cfg(self) -> dict[str, Any]:
        return {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": self.cfg.k}, "k": self.cfg.k,
                "rescale_acts_by_decoder_norm": False}
