"""Data-dependent initialisation of an SAE before training, from a sample of training rows.

1. b_dec at the geometric median (Weiszfeld) or mean of the sample (Anthropic 2023, Gao et al. 2024).
2. With `sae.init_rescale`, the encoder scaled so the first reconstruction x̂ − b_dec has the RMS
   norm of x − b_dec (`SAE.match_input_scale`; unscaled it is ~d_sae / (2 d_in) times too large).
3. The loss scale s = RMS ‖x − b_dec‖ over the sample: with `sae.normalize_loss` the trainer's loss
   is MSE / s² + λ ‖f‖₁ / s, so λ trades the same fraction of unexplained variance against the same
   ‖f‖₁ / ‖x‖ whatever the activations' magnitude (s = 1 otherwise: the paper's raw loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autoencoder.saes import SAE, geometric_median
from tools.core.config import UserError

if TYPE_CHECKING:
    from autoencoder.config import SAETrainConfig


def training_sample(train_dir: Path, rows: int) -> torch.Tensor:
    """Up to `rows` training rows (float64, CPU), read with a fixed seed: the same on every rank."""
    from autoencoder.shard_rows import take_rows

    sample = take_rows(train_dir, rows, seed=12345).double()
    if not torch.isfinite(sample).all():
        raise UserError(f"non-finite values in the activations of {train_dir} (initialisation sample)")
    return sample


@torch.no_grad()
def init_from_sample(sae: SAE, sample: torch.Tensor, c: SAETrainConfig,
                     log: Callable[..., Any] = print, target: torch.Tensor | None = None) -> dict[str, float]:
    """Steps 1-3 of the module docstring on `sae` (in place); returns what was chosen, for cfg.json:
    `b_dec_norm`, `encoder_factor` (1 when not rescaled), `input_scale` (s; 1 when not normalised).
    A transcoder passes the paired output rows as `target`: b_dec and s come from those."""
    out_rows = sample if target is None else target
    if c.b_dec_init != "zeros":
        center = geometric_median(out_rows) if c.b_dec_init == "geometric_median" else out_rows.mean(0)
        sae.b_dec.copy_(center.to(device=sae.b_dec.device, dtype=sae.b_dec.dtype))
    x = sample.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    y = None if target is None else target.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    rms = math.sqrt(float(((x if y is None else y) - sae.b_dec).pow(2).sum(-1).mean()))
    scale = rms if c.normalize_loss and rms > 0 else 1.0
    sae.init_scale(scale)
    factor = sae.match_input_scale(x, y) if c.init_rescale else 1.0
    log(f"init on {sample.shape[0]} rows: b_dec at the {c.b_dec_init.replace('_', ' ')} "
        f"(norm {float(sae.b_dec.norm()):.3g}), encoder x{factor:.3g}, loss scale {scale:.4g}")
    return {"b_dec_norm": float(sae.b_dec.norm()), "encoder_factor": factor, "input_scale": scale,
            "input_rms_norm": rms}
