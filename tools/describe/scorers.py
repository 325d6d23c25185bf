"""Scores of a simulation against the true activations of held-out contexts.

Simulation score (Bills et al. 2023): Pearson correlation of simulated and true activations pooled
over every token of the scoring contexts, signed; `simulation_top` over held-out top contexts only,
`simulation_all` over top + quantile + random (+ uniform) contexts; `simulation_top_uniform` over
top + windows drawn uniformly from held-out text, when the features stage provides them.
Detection: balanced accuracy of "does this
context activate the unit?", predicted as "some simulated activation >= threshold". The true label
(`active`) is the caller's: the describer's per-unit threshold (Describer.truth_threshold: the
first of negative_frac x max_act, as `active_labels` computes it, and the unit's own high
quantiles that leaves negatives among its uniform windows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

SCORES = ("simulation_all", "simulation_top", "detection", "detection_auc")


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Correlation; 0.0 when the prediction is constant (it carries no information about y),
    None when y is constant or there are fewer than two points (undefined)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pearson: shapes differ {a.shape} vs {b.shape}")
    if a.size < 2 or np.ptp(b) == 0:
        return None
    if np.ptp(a) == 0:
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    return float(np.dot(a, b) / math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b))))


def balanced_accuracy(pred: Sequence[bool], truth: Sequence[bool]) -> float | None:
    """Mean of the true-positive and true-negative rates; None unless both classes are present."""
    if len(pred) != len(truth):
        raise ValueError("balanced_accuracy: lengths differ")
    pos = [p for p, t in zip(pred, truth, strict=True) if t]
    neg = [p for p, t in zip(pred, truth, strict=True) if not t]
    if not pos or not neg:
        return None
    return 0.5 * (sum(pos) / len(pos) + sum(not p for p in neg) / len(neg))


def auc(scores: Sequence[float], truth: Sequence[bool]) -> float | None:
    """Probability that a random positive outranks a random negative (ties count half): detection
    without a threshold, so simulators on different scales (0/10 lexical, expected values) compare."""
    pos = [s for s, t in zip(scores, truth, strict=True) if t]
    neg = [s for s, t in zip(scores, truth, strict=True) if not t]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def active_labels(true_acts: Sequence[Sequence[float]], max_act: float, negative_frac: float) -> list[bool]:
    """Whether each context activates the unit: its max activation > negative_frac x max_act."""
    thr = negative_frac * max(max_act, 0.0)
    return [max(a) > thr for a in true_acts]


def score(
    kinds: Sequence[str],
    true_acts: Sequence[Sequence[float]],
    preds: Sequence[Sequence[float] | None],
    *,
    threshold: float,
    active: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """All scores for one simulation; contexts whose prediction is None are left out (see
    `with_failures_as_zero` for the score that counts them). `active`: the
    true detection label per context (default: every non-random context is active)."""
    keep = [i for i, p in enumerate(preds) if p is not None]
    if not keep:
        return {k: None for k in SCORES}

    def pooled(which: set[str]) -> float | None:
        idx = [i for i in keep if kinds[i] in which]
        if not idx:
            return None
        x = [v for i in idx for v in preds[i]]  # type: ignore[union-attr]
        y = [v for i in idx for v in true_acts[i]]
        return pearson(x, y)

    truth = [kinds[i] != "random" for i in keep] if active is None else [bool(active[i]) for i in keep]
    detect = balanced_accuracy([max(preds[i]) >= threshold for i in keep], truth)  # type: ignore[arg-type]
    out = {"simulation_all": pooled({"top", "quantile", "random", "uniform"}),
           "simulation_top": pooled({"top"}), "detection": detect,
           "detection_auc": auc([max(preds[i]) for i in keep], truth)}  # type: ignore[arg-type]
    if any(kinds[i] == "uniform" for i in keep):  # Bills et al.'s top + random, random = uniform windows
        out["simulation_top_uniform"] = pooled({"top", "uniform"})
    return {k: (round(v, 4) if v is not None else None) for k, v in out.items()}


def with_failures_as_zero(preds: Sequence[Sequence[float] | None], lengths: Sequence[int]
                          ) -> list[list[float]]:
    """Predictions with every failed context read as "never active" (all zeros), so a simulator
    that fails on hard contexts is not scored only on the easy ones."""
    return [list(p) if p is not None else [0.0] * n for p, n in zip(preds, lengths, strict=True)]
