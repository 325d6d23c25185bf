"""Neuron resampling (Anthropic 2023, "Towards Monosemanticity", appendix "Neuron Resampling"),
with the changes that make it revive features.

At scheduled steps, features that did not fire during the preceding window are dead. For each
one an input is drawn from the resampling subset with probability proportional to the square of
the autoencoder's loss on it (MSE + λ L1, the paper's "autoencoder's loss"); the feature's
decoder row becomes that input, normalised; its encoder vector the normalised input × 0.2 × the
mean encoder norm of alive features; and the Adam state of exactly those entries is reset.

The paper's recipe (`ResampleRecipe.paper()`) also sets the new encoder bias to 0 and uses the
raw input as the direction. On our activations (all rows share a large mean direction) such a
feature fires on about half of all rows, so resampling many features at once adds a
reconstruction larger than the input and kills rarely-firing alive features; and PyTorch's Adam,
whose step count is per tensor, moves zeroed entries ~3x lr per step. The default
(`ResampleRecipe()`) therefore uses the centred input x − b_dec as the direction, a negative
bias at the (1 − `density`) quantile of the new feature's pre-activations on the resampling
subset (so it fires on about that fraction of rows, always including its seed), and a fresh
per-feature Adam state (`autoencoder.optim.FeatureAdam.reset_features`).

Everything here is deterministic given the generator, so DDP ranks that see the same (all-reduced)
dead mask and the same resampling subset make the same change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoencoder.saes import SAE
from tools.core.config import UserError

QUANTILE_ROWS = 16384  # rows of the subset used to place a new feature's bias


@dataclass
class ResampleRecipe:
    """How a dead feature is re-initialised (defaults: the reviving recipe; see the module doc)."""

    enc_scale: float = 0.2  # encoder vector = unit direction × enc_scale × mean alive encoder norm
    centered: bool = True  # direction x − b_dec (True) or the raw input x (the paper)
    density: float | None = 0.01  # target firing fraction for the bias; None: bias 0 (the paper)
    fresh_adam: bool = True  # reset the step counts too (True) or only the moments
    max_fraction: float = 1.0  # resample at most this fraction of the dictionary per event

    @classmethod
    def paper(cls) -> ResampleRecipe:
        """Anthropic 2023 as written: raw direction, bias 0, Adam moments zeroed."""
        return cls(centered=False, density=None, fresh_adam=False)


def load_resample_set(path: Path, d_in: int) -> torch.Tensor:
    """`resample.npy` as float32 [n, d_in]; an empty, missing or mismatched file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"resampling subset not found: {path} (autoencoder.generate writes it; "
                        "or set sae.resample_steps=[] to train without resampling)")
    from autoencoder.shard_check import verify_resample

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
def per_row_loss(row_loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 chunk: int = 8192) -> torch.Tensor:
    """`row_loss` of every row of `x`, in chunks so a large subset fits in memory."""
    return torch.cat([row_loss(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def pick_dead(dead: torch.Tensor, max_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the dead features to resample: all of them, or a random `max_fraction` of the
    dictionary when more are dead (the rest wait for the next event)."""
    idx = dead.nonzero().squeeze(1)
    cap = max(1, int(max_fraction * dead.numel()))
    if idx.numel() > cap:
        keep = torch.randperm(idx.numel(), generator=generator)[:cap]
        idx = idx[keep.to(idx.device)].sort().values
    return idx


@torch.no_grad()
def resample_dead(sae: SAE, optimizer: torch.optim.Optimizer | None, dead: torch.Tensor,
                  inputs: torch.Tensor, *, generator: torch.Generator,
                  row_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  recipe: ResampleRecipe | None = None) -> torch.Tensor:
    """Re-initialise the features in the boolean mask `dead` [d_sae]; returns their indices.

    `inputs` [n, d_in] is the resampling subset on the SAE's device; `row_loss(x) -> [n]` the
    training loss of each row (default: the squared error summed over d_in). `optimizer` must
    have `reset_features(idx, steps)` (`FeatureAdam`) or be None.
    """
    recipe = recipe or ResampleRecipe()
    idx = pick_dead(dead, recipe.max_fraction, generator)
    n_dead = int(idx.numel())
    if n_dead == 0:
        return idx
    if inputs.shape[0] == 0:
        raise UserError("the resampling subset is empty: cannot resample dead features")
    if row_loss is None:
        def row_loss(x: torch.Tensor) -> torch.Tensor:
            return (sae(x).float() - x.float()).pow(2).sum(-1)
    weights = per_row_loss(row_loss, inputs).double().pow(2)
    if not torch.isfinite(weights).all():
        raise UserError("non-finite reconstruction loss on the resampling subset")
    if weights.sum() <= 0:  # perfect reconstruction everywhere: sample uniformly
        weights = torch.ones_like(weights)
    # one distinct input per dead feature when there are enough candidates (as Anthropic: a
    # sample from the loss-weighted distribution); with replacement otherwise
    replace = n_dead > int((weights > 0).sum())
    pick = torch.multinomial(weights.cpu(), n_dead, replacement=replace, generator=generator)
    seeds = inputs[pick.to(inputs.device)].to(sae.W_dec.dtype)
    chosen = seeds - sae.b_dec if recipe.centered else seeds
    unit = chosen / chosen.norm(dim=1, keepdim=True).clamp_min(1e-12)

    alive = torch.ones_like(dead)
    alive[idx] = False
    enc_norms = sae.W_enc.norm(dim=0)
    mean_alive = float(enc_norms[alive].mean()) if bool(alive.any()) else 1.0
    enc = unit * (recipe.enc_scale * mean_alive)  # [n_dead, d_in]

    sae.W_dec[idx] = unit
    sae.W_enc[:, idx] = enc.t()
    sae.b_enc[idx] = 0.0 if recipe.density is None else new_bias(sae, enc, seeds, inputs,
                                                                   recipe.density, generator)
    if optimizer is not None:
        optimizer.reset_features(idx, steps=recipe.fresh_adam)
    return idx


@torch.no_grad()
def new_bias(sae: SAE, enc: torch.Tensor, seeds: torch.Tensor, inputs: torch.Tensor, density: float,
             generator: torch.Generator) -> torch.Tensor:
    """Encoder biases for new encoder vectors `enc` [n, d_in]: minus the (1 − density) quantile of
    their pre-activations on (a sample of) the resampling subset, but never so low that the seed
    input stops firing (at most half its pre-activation below zero)."""
    n = inputs.shape[0]
    rows = inputs
    if n > QUANTILE_ROWS:
        rows = inputs[torch.randperm(n, generator=generator)[:QUANTILE_ROWS].to(inputs.device)]
    rows = rows.to(enc.dtype) - sae.b_dec
    k = min(rows.shape[0], max(1, round((1.0 - density) * rows.shape[0])))
    q = torch.empty(enc.shape[0], dtype=enc.dtype, device=enc.device)
    for i in range(0, enc.shape[0], 1024):  # [rows, 1024] pre-activations at a time
        q[i:i + 1024] = (rows @ enc[i:i + 1024].t()).kthvalue(k, dim=0).values
    seed_pre = ((seeds - sae.b_dec) * enc).sum(-1)
    return -torch.where(seed_pre > 0, torch.minimum(q, 0.5 * seed_pre), q)
