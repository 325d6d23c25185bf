"""Neuron resampling, as described in Anthropic's "Towards Monosemanticity" (2023), appendix
"Neuron Resampling".

At scheduled steps, features that did not fire during the preceding window are dead. For each
one an input is drawn from the resampling subset with probability proportional to the square of
the autoencoder's reconstruction loss on it; the feature's decoder row becomes that input,
normalised; its encoder vector the normalised input × 0.2 × the mean encoder norm of alive
features; its encoder bias 0; and the Adam moments of exactly those entries are reset, so the
optimizer does not push the new feature with the old one's momentum.

Everything here is deterministic given the generator, so DDP ranks that see the same (all-reduced)
dead mask and the same resampling subset make the same change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from autoencoder.sae import SAE, row_sq_error
from transformer.config import UserError


def load_resample_set(path: Path, d_in: int) -> torch.Tensor:
    """`resample.npy` as float32 [n, d_in]; an empty, missing or mismatched file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"resampling subset not found: {path} (autoencoder.generate writes it; "
                        "or set sae.resample_steps=[] to train without resampling)")
    from autoencoder.shards import verify_resample

    verify_resample(path.parent)  # sha256 against the manifest, when it records one
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 2 or arr.shape[1] != d_in:
        raise UserError(f"{path}: expected shape [n, {d_in}], got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise UserError(f"{path}: the resampling subset is empty (0 rows); regenerate the activations "
                        "or set sae.resample_steps=[]")
    x = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise UserError(f"{path}: contains NaN or Inf values")
    return x


@torch.no_grad()
def per_row_loss(sae: SAE, x: torch.Tensor, mse_reduction: str, chunk: int = 8192) -> torch.Tensor:
    """Reconstruction loss of every row, in chunks so a large subset fits in memory."""
    out = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        out.append(row_sq_error(xb, sae(xb), mse_reduction))
    return torch.cat(out)


@torch.no_grad()
def resample_dead(sae: SAE, optimizer: torch.optim.Optimizer | None, dead: torch.Tensor,
                  inputs: torch.Tensor, *, generator: torch.Generator, mse_reduction: str = "sum",
                  enc_scale: float = 0.2, centered: bool = False) -> int:
    """Re-initialise the features in the boolean mask `dead` [d_sae]; returns how many.

    `inputs` [n, d_in] is the resampling subset on the SAE's device. `centered`: use x − b_dec
    rather than x as the new direction (see `sae.resample_centered`).
    """
    idx = dead.nonzero().squeeze(1)
    n_dead = int(idx.numel())
    if n_dead == 0:
        return 0
    if inputs.shape[0] == 0:
        raise UserError("the resampling subset is empty: cannot resample dead features")
    loss = per_row_loss(sae, inputs, mse_reduction).double()
    weights = loss.pow(2)
    if not torch.isfinite(weights).all():
        raise UserError("non-finite reconstruction loss on the resampling subset")
    if weights.sum() <= 0:  # perfect reconstruction everywhere: sample uniformly
        weights = torch.ones_like(weights)
    # one distinct input per dead feature when there are enough candidates (as Anthropic: a
    # sample from the loss-weighted distribution); with replacement otherwise
    replace = n_dead > int((weights > 0).sum())
    pick = torch.multinomial(weights.cpu(), n_dead, replacement=replace, generator=generator)
    chosen = inputs[pick.to(inputs.device)].to(sae.W_dec.dtype)
    if centered:  # the direction the decoder actually writes: x̄ = x − b_dec
        chosen = chosen - sae.b_dec
    unit = chosen / chosen.norm(dim=1, keepdim=True).clamp_min(1e-12)

    alive = ~dead
    enc_norms = sae.W_enc.norm(dim=0)
    mean_alive = float(enc_norms[alive].mean()) if bool(alive.any()) else 1.0

    sae.W_dec[idx] = unit
    sae.W_enc[:, idx] = (unit * (enc_scale * mean_alive)).t()
    sae.b_enc[idx] = 0.0
    if optimizer is not None:
        reset_adam_rows(optimizer, sae, idx)
    return n_dead


def reset_adam_rows(optimizer: torch.optim.Optimizer, sae: SAE, idx: torch.Tensor) -> None:
    """Zero Adam's first and second moments of the given features' entries, nothing else."""
    where = {id(sae.W_enc): (slice(None), idx), id(sae.b_enc): (idx,), id(sae.W_dec): (idx,)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            sel = where.get(id(p))
            state = optimizer.state.get(p)
            if sel is None or not state:
                continue
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key][sel] = 0.0
