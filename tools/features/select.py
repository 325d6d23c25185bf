"""Choosing each unit's examples from the scan's state: top contexts, equal-width bins, negatives,
and the unit's activation histogram and quantiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tools.features.config import HIST_BINS, FeaturesConfig


def _sig(x: float, digits: int = 5) -> float:
    """Round to significant digits (activation scales differ by orders of magnitude between units)."""
    return float(f"{float(x):.{digits}g}")


def pick_negatives(st: dict[str, np.ndarray], u: int, n_random: int, frac: float,
                   rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Up to n_random contexts whose max is <= frac x the unit's max_act: (never-firing contexts
    sampled over the whole scan, uniform among those; then, if fewer, random candidate contexts
    under the threshold, uniform among the candidates that qualify, drawn with `rng`)."""
    if n_random == 0:
        return [], []
    negs = [int(c) for c in st["neg_c"][u][np.isfinite(st["neg_key"][u])]]
    need = n_random - len(negs)
    extra: list[int] = []
    if need > 0 and st["cand_ctx"].size:
        thr = frac * max(float(st["maxv"][u]), 0.0)
        ok = (st["cand_ctx"] >= 0) & (st["cand_max"][:, u] <= thr)
        taken = set(negs)
        pool = np.array([c for c in st["cand_ctx"][ok].tolist() if c not in taken], dtype=np.int64)
        if pool.size:
            extra = [int(c) for c in rng.choice(pool, size=min(need, pool.size), replace=False)]
    return negs, extra


def hist_record(hist: np.ndarray, scale: float, maxv: float) -> dict[str, list]:
    """Equal-width histogram of positive activations, trimmed to the bins up to the max."""
    if maxv <= 0 or scale <= 0:
        return {"edges": [], "counts": []}
    width = scale / HIST_BINS
    n = min(HIST_BINS, max(1, math.ceil(maxv / width)))
    edges = [_sig(i * width) for i in range(n + 1)]
    return {"edges": edges, "counts": [int(c) for c in hist[:n]]}


def quantile_picks(st: dict[str, np.ndarray], u: int, bins: int, per_bin: int, shown: set[int],
                   rng: np.random.Generator) -> list[tuple[float, float, int, list[tuple[int, int]]]]:
    """Per equal-width bin over (0, max]: (lo, hi, estimated firing tokens, [(ctx, pos)])."""
    maxv = float(st["maxv"][u])
    if maxv <= 0:
        return []
    G, T = HIST_BINS, int(st["T"])
    m = st["res_key"].shape[0] // (st["hist"].shape[0] * G)
    sl = slice(u * G * m, (u + 1) * G * m)
    keys = st["res_key"][sl].reshape(G, m)
    ok = np.isfinite(keys)
    fine = np.broadcast_to(np.arange(G)[:, None], keys.shape)[ok]
    stored = ok.sum(1)
    weight = st["hist"][u][fine] / np.maximum(stored[fine], 1)  # inverse inclusion probability
    act, tok = st["res_act"][sl].reshape(G, m)[ok], st["res_tok"][sl].reshape(G, m)[ok]
    ctx, pos = tok // T, tok % T
    # Efraimidis & Spirakis (2006): the largest u^(1/w) is a weighted sample without replacement
    es = np.log(rng.random(act.shape[0])) / np.maximum(weight, 1e-12)
    out = []
    taken = set(shown)
    for i in range(bins):
        lo, hi = maxv * i / bins, maxv * (i + 1) / bins
        inbin = (act > lo) & (act <= hi) if i < bins - 1 else (act > lo)
        idx = np.nonzero(inbin)[0]
        idx = idx[np.argsort(-es[idx], kind="stable")]
        fresh = [j for j in idx if int(ctx[j]) not in taken]
        chosen = (fresh + [j for j in idx if int(ctx[j]) in taken])[:per_bin]
        taken.update(int(ctx[j]) for j in chosen)
        est = float(weight[idx].sum())
        out.append((lo, hi, int(round(est)), [(int(ctx[j]), int(pos[j])) for j in chosen]))
    return out


@dataclass
class Plan:
    """(ctx, pos in context) of each example of one unit, before windows are computed."""

    unit: int
    top: list[tuple[int, int]]
    quantiles: list[tuple[float, float, int, list[tuple[int, int]]]]
    random: list[tuple[int, int]]
    uniform: list[tuple[int, int]] = field(default_factory=list)


def uniform_picks(n_ctx: int, T: int, n: int, seed: int) -> list[tuple[int, int]]:
    """n (ctx, pos) drawn uniformly over every scanned token, without repeating a context; a
    function of the seed and the scan's size only, so every unit (feature or neuron) gets the same."""
    if n == 0 or n_ctx == 0:
        return []
    rng = np.random.default_rng([seed, 4])
    ctxs = np.sort(rng.choice(n_ctx, size=min(n, n_ctx), replace=False))
    return [(int(c), int(rng.integers(T))) for c in ctxs]


def plan_examples(st: dict[str, np.ndarray], u: int, fc: FeaturesConfig, T: int,
                  rng: np.random.Generator) -> Plan:
    """Examples of one unit from one side's state (`T`: tokens per context)."""
    fired = st["top_v"][u] > 0
    top = [(int(c), int(p)) for c, p in zip(st["top_c"][u][fired], st["top_p"][u][fired], strict=True)]
    q = quantile_picks(st, u, fc.bins, fc.per_bin, {c for c, _ in top}, rng)
    # top-ups draw from their own per-unit stream, so units that need none (most SAE features) get
    # exactly the examples they got before negatives were topped up
    top_up = np.random.default_rng([int(st["seed"]), 2, u])
    negs, extra = pick_negatives(st, u, fc.n_random, fc.negative_frac, top_up)
    rand = [(c, int(rng.integers(T))) for c in negs] + [(c, int(top_up.integers(T))) for c in extra]
    return Plan(u, top, q, rand)


def act_quantiles(pos: dict[str, np.ndarray], neg: dict[str, np.ndarray] | None, u: int, n_tokens: int,
                  probs: Sequence[float], nonpos_known: bool) -> list[float | None]:
    """Quantiles of unit u's activation over every scanned token (signed), from the exact histograms:
    linear within a histogram bin (bins are <= max / 32 wide), the mass at 0 exact. Without the
    negative side (`neg` None) tokens <= 0 sit at 0, exact for SAE features (`nonpos_known`);
    for a signed unit a quantile that falls among them is unknown (None)."""
    G = HIST_BINS
    lo, hi, cnt = [], [], []
    n_neg = 0
    if neg is not None:
        w, m = float(neg["scale"][u]) / G, float(neg["maxv"][u])
        for i in reversed(range(G)):
            if neg["hist"][u][i]:
                lo.append(-min((i + 1) * w, m))
                hi.append(-i * w)
                cnt.append(int(neg["hist"][u][i]))
        n_neg = int(neg["count"][u])
    n_pos = int(pos["count"][u])
    zero_at = len(cnt)
    lo.append(0.0)
    hi.append(0.0)
    cnt.append(max(n_tokens - n_pos - n_neg, 0))
    w, m = float(pos["scale"][u]) / G, float(pos["maxv"][u])
    for i in range(G):
        if pos["hist"][u][i]:
            lo.append(i * w)
            hi.append(min((i + 1) * w, m))
            cnt.append(int(pos["hist"][u][i]))
    c = np.asarray(cnt, dtype=np.float64)
    cum = np.cumsum(c)
    out: list[float | None] = []
    for p in probs:
        target = min(max(p, 0.0), 1.0) * cum[-1]
        j = int(min(np.searchsorted(cum, target, side="left"), len(c) - 1))
        while c[j] == 0 and j + 1 < len(c):
            j += 1
        if j == zero_at and neg is None and not nonpos_known:
            out.append(None)
            continue
        frac = (target - (cum[j] - c[j])) / c[j] if c[j] else 0.0
        out.append(_sig(lo[j] + min(max(frac, 0.0), 1.0) * (hi[j] - lo[j]), 6))
    return out
