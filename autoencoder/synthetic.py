"""Toy activations with known sparse ground truth, to check that an SAE recovers real features.

Each row is a sparse non-negative combination of `n_true` unit directions in `d` dimensions
(each feature fires independently with probability `p_fire`, with a magnitude in [0.5, 1.5)),
the setting of Sharkey et al. 2022 "Taking features out of superposition" and SAELens'
synthetic benchmarks. Recovery is measured as the mean over true features of the best cosine
similarity with any decoder row (the MMCS of Sharkey et al.).
"""

from __future__ import annotations

import torch


def ground_truth(n_true: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """`n_true` random unit directions [n_true, d]."""
    w = torch.randn(n_true, d, generator=generator)
    return w / w.norm(dim=1, keepdim=True)


def sparse_rows(features: torch.Tensor, n: int, p_fire: float, generator: torch.Generator,
                offset: torch.Tensor | None = None) -> torch.Tensor:
    """`n` rows x = c @ features (+ offset) with c sparse, non-negative."""
    n_true = features.shape[0]
    fire = torch.rand(n, n_true, generator=generator) < p_fire
    mag = 0.5 + torch.rand(n, n_true, generator=generator)
    x = (fire * mag) @ features
    return x + offset if offset is not None else x


def mean_max_cosine(true_features: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over true features of the max cosine similarity with a decoder row."""
    t = true_features / true_features.norm(dim=1, keepdim=True)
    W_dec = W_dec.detach()
    w = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((t @ w.t()).max(dim=1).values.mean())
