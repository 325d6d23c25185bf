"""Writing the stage's output: windows recomputed for the chosen contexts, one record per unit in
`features.jsonl`, and `meta.json` (docs/formats.md)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from tools.core.config import resolve_device
from tools.core.files import write_json
from tools.features.config import FORMAT_META, NEGATIVES, FeaturesConfig
from tools.features.dictionary import LOGIT_PATHS
from tools.features.one_pass import scan_sides
from tools.features.records import FILE, write_records
from tools.features.scan import ScanState
from tools.features.select import Plan, _sig, act_quantiles, hist_record, plan_examples, uniform_picks
from tools.features.source import Inputs, UnitActs, logit_effects


def _window_start(pos: int, T: int, L: int, w: int) -> int:
    return min(max(pos - w, 0), T - L)


def window_acts(plans: dict[int, Plan] | Iterable[Plan], acts: UnitActs, inp: Inputs, L: int, w: int,
                device: str, dist: Any = None) -> dict[tuple[int, int, int], np.ndarray]:
    """Activations of each example's own unit over its window, keyed by (unit, ctx, start). Under
    torchrun (`dist`) each rank computes every world-th group of contexts (the groups one process
    forms) and the ranks' results are gathered."""
    wanted: set[tuple[int, int, int]] = set()
    for p in (plans.values() if isinstance(plans, dict) else plans):
        pairs = p.top + p.random + p.uniform + [cp for q in p.quantiles for cp in q[3]]
        wanted.update((p.unit, c, _window_start(pos, inp.T, L, w)) for c, pos in pairs)
    items = sorted(wanted, key=lambda t: (t[1], t[2], t[0]))
    out: dict[tuple[int, int, int], np.ndarray] = {}
    if not items:
        return out
    ctxs = sorted({c for _, c, _ in items})
    B = 16
    by_ctx: dict[int, list[tuple[int, int, int]]] = {}
    for it in items:
        by_ctx.setdefault(it[1], []).append(it)
    starts = list(range(0, len(ctxs), B))
    if dist is not None and dist.world > 1:
        starts = starts[dist.rank::dist.world]
    for i in starts:
        group = ctxs[i:i + B]
        idx = torch.from_numpy(np.stack([np.asarray(inp.tokens[c * inp.T:(c + 1) * inp.T], dtype=np.int64)
                                         for c in group])).to(device)
        x = acts.mlp(idx)  # [b, T, d]
        its = [it for c in group for it in by_ctx[c]]
        local = {c: j for j, c in enumerate(group)}
        for s in range(0, len(its), 1024):
            part = its[s:s + 1024]
            ci = torch.tensor([local[c] for _, c, _ in part], device=device)
            st = torch.tensor([a for _, _, a in part], device=device)
            units = torch.tensor([u for u, _, _ in part], device=device)
            xw = x[ci[:, None], st[:, None] + torch.arange(L, device=device)[None, :]]  # [E, L, d]
            a = acts.some_units(xw, units).float().cpu().numpy()
            for it, row in zip(part, a, strict=True):
                out[it] = row
    if dist is not None and dist.world > 1:
        return {k: v for part in dist.gather(out) for k, v in part.items()}
    return out


@dataclass
class Windows:
    """What the examples of a chunk of units are cut from: tokens, window activations, token text."""

    inp: Inputs
    wins: dict[tuple[int, int, int], np.ndarray]  # (unit, ctx, start) -> activations (window_acts)
    text: Any  # tools.tokens.TokenText
    L: int  # window length
    w: int  # tokens each side of the hit
    cache: dict[tuple[int, int], tuple[list[int], list[str]]] = field(default_factory=dict)  # decoded


def build_examples(plan: Plan, win: Windows, maxv: float, sign: int = 1) -> dict[str, Any]:
    """The Example dicts of one unit (docs/formats.md).

    `sign` -1: the negative side (plan from the negated scan): `bottom` examples with `min`, bins
    below 0; `maxv` is then the largest magnitude below 0.
    """
    inp, text, L, w, cache, wins = win.inp, win.text, win.L, win.w, win.cache, win.wins
    T = inp.T
    # activations kept to ~4 significant digits of the unit's max (decimals, so zeros stay short)
    decimals = 4 if maxv <= 0 else min(12, max(2, 4 - math.floor(math.log10(maxv))))
    peak = "max" if sign > 0 else "min"

    def example(u_key: int, ctx: int, pos: int) -> dict[str, Any]:
        start = _window_start(pos, T, L, w)
        if (ctx, start) not in cache:
            g = ctx * T + start
            ids = [int(t) for t in inp.tokens[g:g + L]]
            prefix = [int(t) for t in inp.tokens[max(0, g - 3):g]]
            cache[(ctx, start)] = (ids, text.strs(ids, prefix))
        ids, strs = cache[(ctx, start)]
        a = wins[(u_key, ctx, start)]
        acts = np.round(a.astype(np.float64), decimals).tolist()
        top = float(a.max() if sign > 0 else a.min())
        return {"ctx": ctx, "start": start, "pos": pos - start, peak: round(top, decimals),
                "tokens": ids, "strs": strs, "acts": [0 if x == 0 else x for x in acts]}

    u = plan.unit

    def interval(lo: float, hi: float) -> tuple[float, float]:
        return (lo, hi) if sign > 0 else (-hi, -lo)

    bins = []
    for lo, hi, n, ex in plan.quantiles:
        a, b = interval(lo, hi)
        bins.append({"lo": _sig(a, 7), "hi": _sig(b, 7), "count": n,
                     "examples": [example(u, c, p) for c, p in ex]})
    out = {
        "top" if sign > 0 else "bottom": [example(u, c, p) for c, p in plan.top],
        "quantiles": bins if sign > 0 else bins[::-1],  # ascending by activation on both sides
        "random": [example(u, c, p) for c, p in plan.random],
    }
    if sign > 0 and plan.uniform:  # the same windows for every unit, whatever it does there
        out["uniform"] = [example(u, c, p) for c, p in plan.uniform]
    return out


def _side_stats(st: dict[str, np.ndarray], u: int, tokens: int, sign: int) -> dict[str, Any]:
    maxv = float(st["maxv"][u])
    return {"density": float(st["count"][u] / tokens), ("max_act" if sign > 0 else "min_act"): sign * maxv,
            "mean_act": sign * float(st["total"][u] / st["count"][u]) if st["count"][u] else 0.0,
            "hist": hist_record(st["hist"][u], float(st["scale"][u]), maxv)}


def scan_and_write(cfg: DictConfig, fc: FeaturesConfig, name: str, inp: Inputs, out: Path, chash: str,
                   text, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scan one unit set in one process, then `write_set`."""
    device = resolve_device(cfg.get("device", "auto"))
    pos_state, neg_state, tok_per_s = scan_sides(inp, fc, int(cfg.seed), device, negative=fc.both_sides())
    return write_set(cfg, fc, name, inp, out, chash, text, (pos_state, neg_state), tok_per_s, device,
                     extra_meta)


def write_set(cfg: DictConfig, fc: FeaturesConfig, name: str, inp: Inputs, out: Path, chash: str, text: Any,
              sides: tuple[ScanState, ScanState | None], tok_per_s: float, device: str,
              extra_meta: dict[str, Any] | None = None, dist: Any = None) -> dict[str, Any]:
    """features.jsonl and meta.json of one unit set from its scanned state (`sides`). Under torchrun
    every rank plans the examples and computes its share of the windows; rank 0 writes."""
    seed = int(cfg.seed)
    both = fc.both_sides()
    pos_state, neg_state = sides
    master = dist is None or dist.master
    st = pos_state.numpy()
    sn = neg_state.numpy() if neg_state is not None else None
    vocab = min(inp.model.vocab_size, text.n_vocab)
    pos_i, pos_v, neg_i, neg_v = logit_effects(inp, fc.logit_k, vocab)
    tokens_scanned = inp.n_ctx * inp.T
    rng = np.random.default_rng(seed)
    rng_neg = np.random.default_rng([seed, 3])  # its own stream: the positive side is unchanged
    acts = UnitActs(inp, fc.dtype)
    L = min(2 * fc.window + 1, inp.T)
    F = inp.n_units
    density = st["count"] / tokens_scanned
    uniform = uniform_picks(inp.n_ctx, inp.T, fc.n_uniform, seed)
    with write_records(out / FILE) if master else contextlib.nullcontext(None) as write:
        bar = tqdm(range(0, F, fc.unit_chunk), desc="examples", unit="chunk", leave=False)
        for u0 in bar:
            units = range(u0, min(u0 + fc.unit_chunk, F))
            plans = {u: plan_examples(st, u, fc, inp.T, rng) for u in units}
            for p in plans.values():
                p.uniform = uniform
            neg_plans = {u: plan_examples(sn, u, fc, inp.T, rng_neg) for u in units} if sn is not None else {}
            wins = window_acts([*plans.values(), *neg_plans.values()], acts, inp, L, fc.window, device, dist)
            if not master:
                continue
            win = Windows(inp, wins, text, L, fc.window)  # decoded windows are shared by units
            for u in units:
                rec = {
                    "index": u, **_side_stats(st, u, tokens_scanned, 1),
                    "logits": {
                        "pos": [{"id": int(t), "str": text.single(int(t)), "value": _sig(v)}
                                for t, v in zip(pos_i[u], pos_v[u], strict=True)],
                        "neg": [{"id": int(t), "str": text.single(int(t)), "value": _sig(v)}
                                for t, v in zip(neg_i[u], neg_v[u], strict=True)]},
                    **build_examples(plans[u], win, float(st["maxv"][u])),
                    "act_quantiles": act_quantiles(st, sn, u, tokens_scanned, fc.act_quantiles,
                                                   nonpos_known=inp.sae is not None),
                }
                if sn is not None:
                    rec["neg"] = {**_side_stats(sn, u, tokens_scanned, -1),
                                  **build_examples(neg_plans[u], win, float(sn["maxv"][u]), sign=-1)}
                write(rec)
    logit_path = inp.dictionary.logit_path if inp.dictionary is not None else "neurons"
    counts = st["count"]
    alive = int((counts > 0).sum())
    logd = np.log10(np.maximum(density, 1e-12))
    edges = np.linspace(-10, 0, 41)
    hist_counts = np.histogram(logd[counts > 0], bins=edges)[0] if alive else np.zeros(40, int)
    meta = {
        "format": FORMAT_META, "unit": fc.unit, "name": name, "n_units": F, "split": fc.split,
        "contexts": inp.n_ctx, "context_len": inp.T, "tokens_scanned": tokens_scanned,
        "window": fc.window, "top_k": fc.top_k,
        "bins": {"kind": "equal-width", "n": fc.bins, "per_bin": fc.per_bin,
                 "over": "(0, max_act] of firing-token activations; examples uniform within a bin"},
        "n_random": fc.n_random, "layer": inp.layer,
        "negatives": NEGATIVES.format(frac=fc.negative_frac, cand=min(fc.negative_candidates, inp.n_ctx)),
        "negative_frac": fc.negative_frac, "negative_candidates": min(fc.negative_candidates, inp.n_ctx),
        "negative_side": both,
        "act_quantiles": list(fc.act_quantiles),
        "hook_name": inp.hook,
        "dictionary": inp.dictionary.record if inp.dictionary is not None else None,
        "sae_metrics": inp.dictionary.metrics if inp.dictionary is not None else None,
        "density_log10_histogram": {"edges": [float(e) for e in edges],
                                    "counts": [int(c) for c in hist_counts], "dead": F - alive},
        "alive": alive, "dead": F - alive,
        "logit_path": logit_path, "logit_effects": LOGIT_PATHS[logit_path],
        "scan_tokens_per_s": round(tok_per_s, 1), "seed": seed,
        "inputs": inp.files, "config_hash": chash, "config": asdict(fc), **(extra_meta or {}),
    }
    if master:
        write_json(out / "meta.json", meta)
    return meta

