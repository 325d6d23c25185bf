"""The SAE training step (`TrainStep`: forward, loss, backward, all-reduce, Adam, decoder renorm)
and the per-step schedules (learning rate, L1 coefficient, dead threshold). This is the hot path
that `autoencoder.trainer.Trainer` calls every step and tools/bench times."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from autoencoder.optim import FeatureAdam
from autoencoder.resample import ResampleRecipe
from autoencoder.saes import SAE

if TYPE_CHECKING:
    from autoencoder.config import SAETrainConfig



class TrainStep:
    """Forward, loss, backward, (DDP all-reduce), parallel-gradient removal, Adam, decoder renorm.

    `step(x, l1_coeff=None, dead_mask=None, target=None) -> dict` of detached tensors: `loss`,
    `mse`, `sparsity` (the architecture's λ-free sparsity term or AuxK), `l0`, `fired` (bool
    [d_sae]: fired on this batch), plus the architecture's extra terms. `l1_coeff` is the sparsity
    coefficient of whatever kind (`SAE.coeff_field`: l1_coeff, l0_coeff); `target` the rows a
    transcoder reconstructs. No host sync happens inside (for the architectures with a fixed L0),
    so a benchmark can time it back to back. `input_scale` s (set by the trainer when
    `sae.normalize_loss`) divides the MSE term by s² and the L1 term by s.
    """

    def __init__(self, sae: SAE, optimizer: torch.optim.Optimizer, cfg: SAETrainConfig,
                 world_size: int = 1, input_scale: float = 1.0):
        self.sae, self.optimizer, self.cfg, self.world_size = sae, optimizer, cfg, world_size
        self.coeff_name = sae.coeff_field or "l1_coeff"
        self.l1_coeff = getattr(cfg, self.coeff_name)
        self.aux_k = cfg.aux_k or max(1, sae.cfg.d_in // 2)
        self.params = [getattr(sae, n) for n in sae.param_names()]
        self.loss_fn = torch.compile(sae.loss) if cfg.compile else sae.loss
        self.set_scale(input_scale)
        dev = sae.W_dec.device.type
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.autocast and dev == "cuda" else torch.autocast(dev, enabled=False))

    def set_scale(self, s: float) -> None:
        """MSE and L1 divisors for an input RMS norm `s` (summed over d_in; /d_in under `mean`)."""
        self.input_scale = s
        self.mse_scale = s * s / (self.sae.cfg.out_dim if self.cfg.mse_reduction == "mean" else 1)
        self.l1_scale = s
        self.sae.set_scale(s)

    def __call__(self, x: torch.Tensor, l1_coeff: float | None = None,
                 dead_mask: torch.Tensor | None = None,
                 target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        coeff = {self.coeff_name: self.l1_coeff if l1_coeff is None else l1_coeff}
        with self.autocast:
            t = self.loss_fn(x, **coeff, target=target,
                             mse_reduction=self.cfg.mse_reduction, dead_mask=dead_mask,
                             aux_k=self.aux_k, aux_coeff=self.cfg.aux_coeff,
                             mse_scale=self.mse_scale, l1_scale=self.l1_scale,
                             batch_sum=self._batch_sum if self.world_size > 1 else None)
        self.optimizer.zero_grad(set_to_none=True)
        t.overall.backward()
        if self.world_size > 1:
            self._all_reduce_grads()
        self.sae.remove_parallel_grad()
        self.optimizer.step()
        self.sae.normalize_decoder()
        self.sae.after_step()
        l0, fired = t.l0_and_fired()
        return {"loss": t.overall.detach(), "mse": t.mse.detach(), "sparsity": t.sparsity.detach(),
                "l0": l0, "fired": fired, **t.extra}

    def row_loss(self, x: torch.Tensor, l1_coeff: float) -> torch.Tensor:
        """The training loss of each row (no auxiliary terms): what resampling weights inputs by."""
        return self.sae.row_loss(x, x, coeff=l1_coeff, mse_reduction=self.cfg.mse_reduction,
                                 mse_scale=self.mse_scale, l1_scale=self.l1_scale)

    @staticmethod
    def _batch_sum(t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a (detached) statistic of the batch."""
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def _all_reduce_grads(self) -> None:
        """Average gradients over ranks in one collective (equal per-rank batches, so this is the
        gradient of the global batch mean)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        i = 0
        for p, g in zip(self.params, grads, strict=True):
            n = g.numel()
            p.grad = flat[i:i + n].view_as(p)
            i += n


def make_optimizer(sae: SAE, cfg: SAETrainConfig) -> FeatureAdam:
    """Adam with per-feature step counts (`autoencoder.optim`), so resampled features restart."""
    return FeatureAdam([(n, getattr(sae, n)) for n in sae.param_names()], lr=cfg.lr,
                       betas=(cfg.beta1, cfg.beta2), lr_scale={"W_dec": cfg.decoder_lr_scale})


def make_step(sae: SAE, optimizer: torch.optim.Optimizer, cfg: SAETrainConfig,
              world_size: int = 1) -> TrainStep:
    """The full training step as one callable: `step = make_step(...); out = step(batch)`."""
    return TrainStep(sae, optimizer, cfg, world_size)


def lr_at(step: int, c: SAETrainConfig, last_resample: int | None) -> float:
    """LR for the update that completes step `step + 1`: linear warmup, then constant / cosine /
    linear decay, times a linear re-warmup after each resampling when configured."""
    scale = min(1.0, (step + 1) / c.lr_warmup_steps) if c.lr_warmup_steps > 0 else 1.0
    if c.lr_schedule != "constant":
        span = max(1, c.steps - c.lr_warmup_steps)
        p = min(1.0, max(0.0, (step - c.lr_warmup_steps) / span))
        shape = 0.5 * (1 + math.cos(math.pi * p)) if c.lr_schedule == "cosine" else 1 - p
        scale *= c.min_lr_ratio + (1 - c.min_lr_ratio) * shape
    if last_resample is not None and c.resample_lr_warmup_steps > 0:
        scale *= min(1.0, (step - last_resample + 1) / c.resample_lr_warmup_steps)
    return c.lr * scale


def l1_at(step: int, c: SAETrainConfig, field: str = "l1_coeff") -> float:
    """Sparsity coefficient `field` (l1_coeff, l0_coeff) with its linear warmup from 0 over
    `sae.l1_warmup_steps`, as in Conerly et al. 2024."""
    value = getattr(c, field)
    if c.l1_warmup_steps > 0:
        return value * min(1.0, (step + 1) / c.l1_warmup_steps)
    return value


def dead_steps(c: SAETrainConfig, aux: bool = False) -> int:
    """`sae.dead_tokens` in steps: a feature silent this many steps counts as dead (for resampling;
    `aux`: for AuxK, `sae.aux_dead_tokens` when set)."""
    tokens = c.aux_dead_tokens if aux and c.aux_dead_tokens is not None else c.dead_tokens
    return max(1, math.ceil(tokens / c.batch_size))


def recipe(c: SAETrainConfig) -> ResampleRecipe:
    return ResampleRecipe(enc_scale=c.resample_enc_scale, centered=c.resample_centered,
                          density=c.resample_density, fresh_adam=c.resample_fresh_adam,
                          max_fraction=c.resample_max_fraction)
