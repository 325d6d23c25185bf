"""Planted units in the features.jsonl format, for tests and for checking a scorer by eye.

Each unit is a rule over token strings (fires on " thou"; fires on the token after " the"; fires
at random), applied to random word sequences; the records are built the way docs/formats.md says
the features stage builds them (top contexts, quantile bins of the max activation, non-firing
random contexts), so a describer that works here has not been tuned to one feature. Negatives
follow the features stage's rule: contexts whose max is <= negative_frac x the unit's max, so a
GELU-like neuron (small nonzero values everywhere) gets them too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tools.core.layout import RunLayout
from tools.features.records import FILE, write_records

WORDS = [" the", " a", " of", " and", " to", " in", " king", " lord", " sweet", " love", " night",
         " fair", " good", " my", " thy", " thee", " art", " is", " was", " with", ",", ".", " not",
         " be", " that", " this", " he", " she", " I", " you", " me", " what", " so", " but", " all"]

Rule = Callable[[list[str], np.random.Generator], list[float]]


def fires_on(word: str) -> Rule:
    def rule(strs: list[str], rng: np.random.Generator) -> list[float]:
        return [float(rng.uniform(3, 6)) if s == word else 0.0 for s in strs]
    return rule


def fires_after(word: str) -> Rule:
    def rule(strs: list[str], rng: np.random.Generator) -> list[float]:
        return [float(rng.uniform(2, 5)) if i > 0 and strs[i - 1] == word else 0.0 for i in range(len(strs))]
    return rule


def fires_randomly(p: float = 0.03) -> Rule:
    def rule(strs: list[str], rng: np.random.Generator) -> list[float]:
        return [float(rng.uniform(0.5, 5)) if rng.random() < p else 0.0 for _ in strs]
    return rule


def gelu_like_on(word: str) -> Rule:
    """A GELU neuron's profile: small negative/positive values on every token (never exactly 0),
    large on `word`."""
    def rule(strs: list[str], rng: np.random.Generator) -> list[float]:
        return [float(rng.uniform(3, 6)) if s == word else float(rng.uniform(-0.17, 0.3)) for s in strs]
    return rule


def contexts(n: int, length: int, seed: int, extra: dict[str, float] | None = None) -> list[list[str]]:
    """Random word sequences; `extra` raises the frequency of given words (e.g. {" thou": 0.05})."""
    rng = np.random.default_rng(seed)
    extra = extra or {}
    words = WORDS + list(extra)
    p = np.array([1.0] * len(WORDS) + [0.0] * len(extra))
    p = p / p.sum() * (1 - sum(extra.values()))
    p[len(WORDS):] = list(extra.values())
    return [[words[j] for j in rng.choice(len(words), size=length, p=p)] for _ in range(n)]


QUANTILE_PROBS = (0.0001, 0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)  # the features stage's


def unit_record(index: int, ctxs: list[list[str]], rule: Rule, seed: int, *, top_k: int = 20,
                bins: int = 3, per_bin: int = 4, n_random: int = 20, negative_frac: float = 0.1,
                n_uniform: int = 0, quantiles: bool = False) -> dict[str, Any]:
    """One unit's record; `n_uniform` windows drawn uniformly over the contexts (the same for every
    unit), `quantiles` adds the signed activation quantiles at QUANTILE_PROBS."""
    rng = np.random.default_rng([seed, index])
    acts = [rule(strs, rng) for strs in ctxs]

    def example(c: int) -> dict[str, Any]:
        a = acts[c]
        return {"ctx": c, "start": 0, "pos": int(np.argmax(a)), "max": max(a), "tokens": [0] * len(a),
                "strs": ctxs[c], "acts": a}

    maxes = np.array([max(a) for a in acts])
    firing = [int(c) for c in np.argsort(-maxes, kind="stable") if maxes[c] > 0]
    top = [example(c) for c in firing[:top_k]]
    quantiles = []
    if firing:
        edges = np.linspace(0, maxes.max(), bins + 1)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            inside = [c for c in firing if lo < maxes[c] <= hi]
            pick = rng.permutation(inside)[:per_bin] if inside else []
            quantiles.append({"lo": float(lo), "hi": float(hi), "examples": [example(int(c)) for c in pick]})
    thr = negative_frac * max(float(maxes.max()), 0.0)
    silent = [c for c in range(len(ctxs)) if maxes[c] <= thr]
    random_ex = [example(int(c)) for c in rng.permutation(silent)[:n_random]]
    positive = np.concatenate([np.array(a)[np.array(a) > 0] for a in acts]) if firing else np.zeros(0)
    n_tokens = sum(len(a) for a in acts)
    rec = {"index": index, "density": float(positive.size / n_tokens), "max_act": float(maxes.max()),
           "mean_act": float(positive.mean()) if positive.size else 0.0,
           "hist": {"edges": [0.0, 1.0], "counts": [int(positive.size)]},
           "logits": {"pos": [], "neg": []}, "top": top, "quantiles": quantiles, "random": random_ex}
    if n_uniform:
        n = min(n_uniform, len(ctxs))
        picks = np.random.default_rng([seed, 4]).choice(len(ctxs), size=n, replace=False)
        rec["uniform"] = [example(int(c)) for c in picks]
    if quantiles:
        every = np.concatenate([np.asarray(a, dtype=np.float64) for a in acts])
        rec["act_quantiles"] = [float(v) for v in np.quantile(every, QUANTILE_PROBS)]
    return rec


def write_features(run_dir: str | Path, name: str, rules: list[Rule], *, n_ctx: int = 300, length: int = 24,
                   seed: int = 0, extra: dict[str, float] | None = None, unit: str = "sae",
                   negative_frac: float | None = 0.1, n_uniform: int = 10, quantiles: bool = True) -> Path:
    """Write run_dir/features/<name>/{features.jsonl,meta.json} for the given rules; returns the folder.
    negative_frac=None writes a meta.json without the key (as older scans did; describe assumes 0.1);
    `n_uniform` windows and activation quantiles as the features stage writes them by default."""
    ctxs = contexts(n_ctx, length, seed, extra)
    folder = RunLayout(Path(run_dir)).features(name)
    folder.mkdir(parents=True, exist_ok=True)
    with write_records(folder / FILE) as write:
        for i, rule in enumerate(rules):
            frac = 0.1 if negative_frac is None else negative_frac
            write(unit_record(i, ctxs, rule, seed, negative_frac=frac, n_uniform=n_uniform,
                              quantiles=quantiles))
    meta = {"format": "monosemantic.features_meta/1", "unit": unit, "name": name, "n_units": len(rules),
            "split": "val", "contexts": n_ctx, "tokens_scanned": n_ctx * length, "window": length}
    if negative_frac is not None:
        meta["negative_frac"] = negative_frac
    if quantiles:
        meta["act_quantiles"] = list(QUANTILE_PROBS)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return folder
