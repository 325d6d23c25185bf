"""Summaries of a describe run: per-score means with bootstrap 95% intervals, controls beside them,
failed contexts counted, and means broken down by unit density decile."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import numpy as np

from tools.describe.scorers import SCORES

CONTROLS = ("random_description", "shuffled_tokens")
BOOTSTRAP = 1000  # resamples of the units for each interval
BOOTSTRAP_SEED = 0  # fixed: the interval is a function of the scores alone


def bootstrap_ci(values: list[float], n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> list[float] | None:
    """Percentile 95% interval of the mean over `n` resamples of the values (None below two values)."""
    if len(values) < 2:
        return None
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n, len(x)))
    means = x[idx].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "median": None, "n": 0, "ci95": None}
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "n": len(values), "ci95": bootstrap_ci(values)}


def _score_keys(ok: list[dict[str, Any]]) -> list[str]:
    extra = sorted({k for r in ok for k in (r.get("scores") or {}) if k not in SCORES})
    return list(SCORES) + extra


def density_deciles(ok: list[dict[str, Any]], key: str = "simulation_all") -> list[dict[str, Any]]:
    """Mean `key` per decile of unit density (deciles over the described units that have both)."""
    rows = [(r["density"], r["scores"][key]) for r in ok
            if isinstance(r.get("density"), (int, float)) and (r.get("scores") or {}).get(key) is not None]
    if len(rows) < 2:
        return []
    dens = np.array([d for d, _ in rows])
    edges = np.quantile(dens, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(edges, dens, side="right") - 1, 0, 9)
    out = []
    for k in range(10):
        vals = [v for (_, v), w in zip(rows, which, strict=True) if w == k]
        if vals:
            out.append({"decile": k, "density_min": float(edges[k]), "density_max": float(edges[k + 1]),
                        **stats(vals)})
    return out


def selection_stats(ok: list[dict[str, Any]]) -> dict[str, Any] | None:
    """With candidates > 1: the chosen candidates' test simulation_all beside the first (unselected)
    candidate's on the same test windows, and their paired difference (the gain from selection)."""
    pairs = [(r["scores"]["simulation_all"], r["selection"]["first_candidate_test_simulation_all"],
              r["selection"].get("validation_simulation_all")) for r in ok if r.get("selection")]
    if not pairs:
        return None
    both = [(c, f) for c, f, _ in pairs if c is not None and f is not None]
    return {"units": len(pairs),
            "chosen_validation": stats([v for _, _, v in pairs if v is not None]),
            "chosen_test": stats([c for c, _ in both]), "first_candidate_test": stats([f for _, f in both]),
            "gain": stats([round(c - f, 6) for c, f in both])}


def summarize(records: list[dict[str, Any]], n_units: int) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]
    keys = _score_keys(ok)
    scores = {k: stats([r["scores"][k] for r in ok if r["scores"].get(k) is not None]) for k in keys}
    controls = {c: {k: stats([r["controls"][c][k] for r in ok if (r.get("controls") or {}).get(c)
                              and r["controls"][c].get(k) is not None]) for k in keys} for c in CONTROLS}
    usage: Counter[str] = Counter()
    for r in records:
        usage.update(r.get("usage") or {})
    reasons = Counter((r.get("reason") or "")[:80] for r in records if r["status"] != "ok")
    return {
        "units": n_units, "described": len(ok),
        "failed": sum(r["status"] == "failed" for r in records),
        "skipped": sum(r["status"] == "skipped" for r in records),
        "pending": n_units - len(records), "complete": len(records) == n_units,
        "failed_contexts": sum(int(r.get("failed_contexts") or 0) for r in records),
        "scores": scores, "controls": controls,
        "by_density_decile": density_deciles(ok), "selection": selection_stats(ok),
        "simulator_modes": dict(Counter(r.get("simulator_mode") for r in ok if r.get("simulator_mode"))),
        "usage": dict(usage), "reasons": dict(reasons.most_common(10)),
    }


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ci(s: dict[str, Any]) -> str:
    return "" if not s.get("ci95") else f"[{s['ci95'][0]:.2f},{s['ci95'][1]:.2f}]"


def print_table(summary: dict[str, Any]) -> None:
    print(f"\ndescriptions of {summary['name']}: {summary['described']} described, {summary['failed']} "
          f"failed, {summary['skipped']} skipped of {summary['units']} units "
          f"({summary['explainer']} explainer, {summary['simulator']} simulator; "
          f"{summary.get('failed_contexts', 0)} failed contexts)")
    print(f"{'score':<30} {'mean':>7} {'95% CI':>13} {'n':>5} | {'random desc':>11} {'shuffled':>9}")
    c = summary["controls"]
    for k, s in summary["scores"].items():
        print(f"{k:<30} {_f(s['mean']):>7} {_ci(s):>13} {s['n']:>5} | "
              f"{_f(c['random_description'][k]['mean']):>11} {_f(c['shuffled_tokens'][k]['mean']):>9}")
    u = summary["usage"]
    if u.get("calls") or u.get("cached") or u.get("forwards"):
        print(f"LLM: {u.get('calls', 0)} calls ({u.get('cached', 0)} cached, {u.get('retries', 0)} retries), "
              f"{u.get('forwards', 0)} simulator forwards, {u.get('prompt_tokens', 0)} prompt + "
              f"{u.get('completion_tokens', 0)} completion tokens")


def flat_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's view: counts, and per score its mean, median, n, interval and control means."""
    out = {k: summary[k] for k in ("units", "described", "failed", "skipped")}
    out["failed_contexts"] = summary.get("failed_contexts", 0)
    out["explainer"], out["simulator"] = summary.get("explainer"), summary.get("simulator")
    out["model"] = summary.get("model")
    for k, s in summary["scores"].items():
        out[f"{k}_mean"] = s["mean"]
        out[f"{k}_median"] = s["median"]
        out[f"{k}_n"] = s["n"]
        out[f"{k}_ci95"] = s.get("ci95")
        for c in CONTROLS:
            cs = summary["controls"][c].get(k) or {}
            out[f"{k}_{c}_mean"] = cs.get("mean")
            out[f"{k}_{c}_ci95"] = cs.get("ci95")
    u = summary["usage"]
    out["tokens"] = int(u.get("prompt_tokens", 0)) + int(u.get("completion_tokens", 0))
    out["llm_calls"] = int(u.get("calls", 0))
    out["simulator_forwards"] = int(u.get("forwards", 0))
    return out
