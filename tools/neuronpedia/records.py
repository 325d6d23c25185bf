"""One features.jsonl record as SAEDashboard's Neuronpedia feature record (`batch-N.json`).

Field names and meanings follow SAEDashboard's `NeuronpediaDashboardFeature` /
`NeuronpediaDashboardActivation` (`sae_dashboard/neuronpedia/neuronpedia_dashboard.py`):

- `pos_str`/`pos_values`, `neg_str`/`neg_values`: the top and bottom direct logit effects;
- `frac_nonzero`: the fraction of scanned tokens on which the side is active (> 0);
- `freq_hist_data_bar_values`/`..._heights`: bin midpoints and token counts of the side's
  activation histogram (SAEDashboard's `HistogramData`: midpoints, counts);
- `activations`: the top examples (`bin_min` -1, `bin_max` the unit's max, `bin_contains` -1, as
  SAEDashboard marks its "TOP ACTIVATIONS" group), then the equal-width bins' examples (`bin_min`,
  `bin_max` the bin's bounds, `bin_contains` the bin's share of the side's active tokens);
  `qualifying_token_index` is the example's `pos`.

What features.jsonl does not hold is written empty, never invented: the logit histogram over the
whole vocabulary, neuron alignment, correlated neurons and features, the attention-head decoder
weight distribution and the decoder vector.

A signed unit's negative side (`neg` in the record) becomes a unit of its own, the negated unit:
activations and bin bounds negated (so it is active where they are > 0), the bottom examples as its
top ones, and the logit effects with their roles swapped and their signs flipped.
"""

from __future__ import annotations

import math
import re
from typing import Any

SIDES = ("pos", "neg")
TOP_BIN = -1  # SAEDashboard's bin_min / bin_contains of the top-activations group
EMPTY_LISTS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
               "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
               "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
               "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist",
               "vector")
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, a surrogate code point is always a lone one
DIGITS = 6  # significant digits kept of derived values (bin midpoints, fractions)


def clean(s: Any) -> str:
    """A token string as valid UTF-8 text: lone surrogates (possible in JSON input) become U+FFFD."""
    return _SURROGATE.sub("\ufffd", s if isinstance(s, str) else str(s))


def _sig(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


def _num(x: Any, sign: int) -> float:
    v = float(x) * sign
    return 0.0 if v == 0 else v  # no -0.0


def histogram(hist: dict[str, Any] | None) -> tuple[list[float], list[int]]:
    """(bar midpoints, counts) of a features.jsonl `hist` (`edges` n+1, `counts` n)."""
    if not isinstance(hist, dict):
        return [], []
    edges, counts = list(hist.get("edges") or []), list(hist.get("counts") or [])
    if len(edges) != len(counts) + 1:
        raise ValueError(f"hist has {len(edges)} edges for {len(counts)} counts (expected counts + 1)")
    mids = [_sig((float(a) + float(b)) / 2) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return mids, [int(c) for c in counts]


def activation(ex: dict[str, Any], bin_min: float, bin_max: float, bin_contains: float | None,
               sign: int) -> dict[str, Any]:
    """One example window as an SAEDashboard activation record."""
    tokens, acts = ex.get("strs"), ex.get("acts")
    if not isinstance(tokens, list) or not isinstance(acts, list) or len(tokens) != len(acts):
        raise ValueError("an example needs `strs` and `acts` of the same length")
    pos = int(ex.get("pos", 0))
    if not 0 <= pos < len(acts):
        raise ValueError(f"an example's `pos` {pos} is outside its {len(acts)} tokens")
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
            "tokens": [clean(t) for t in tokens], "values": [_num(a, sign) for a in acts],
            "qualifying_token_index": pos}


def _bins(side: dict[str, Any], sign: int) -> list[dict[str, Any]]:
    bins = side.get("quantiles") or []
    if sign < 0:
        bins = bins[::-1]  # ascending on the negated unit's scale, as the positive side's
    counts = [b.get("count") for b in bins]
    known = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in counts)
    total = sum(counts) if known and bins else 0
    out = []
    for b, c in zip(bins, counts, strict=True):
        lo, hi = (float(b["lo"]), float(b["hi"])) if sign > 0 else (-float(b["hi"]), -float(b["lo"]))
        share = _sig(c / total) if known and total > 0 else None
        out += [activation(ex, _num(lo, 1), _num(hi, 1), share, sign) for ex in b.get("examples") or []]
    return out


def side_view(rec: dict[str, Any], side: str) -> dict[str, Any] | None:
    """The statistics and examples of one side of a record, in the positive side's terms; None when
    the record has no such side."""
    if side == "pos":
        return {"density": rec.get("density"), "peak": rec.get("max_act"), "hist": rec.get("hist"),
                "top": rec.get("top") or [], "quantiles": rec.get("quantiles") or []}
    neg = rec.get("neg")
    if not isinstance(neg, dict):
        return None
    min_act = neg.get("min_act")
    return {"density": neg.get("density"), "peak": None if min_act is None else -float(min_act),
            "hist": neg.get("hist"), "top": neg.get("bottom") or [], "quantiles": neg.get("quantiles") or []}


def feature(rec: dict[str, Any], side: str, *, n_prompts: int, n_tokens: int, dataset: str) -> dict[str, Any]:
    """SAEDashboard's feature record of one side of a features.jsonl record (ValueError when the
    record is malformed, or has no such side)."""
    view = side_view(rec, side)
    if view is None:
        raise ValueError(f"no `{side}` side in the record")
    sign = 1 if side == "pos" else -1
    logits = rec.get("logits") or {}
    up, down = (logits.get("pos") or [], logits.get("neg") or []) if sign > 0 else \
        (logits.get("neg") or [], logits.get("pos") or [])
    mids, heights = histogram(view["hist"])
    peak = view["peak"]
    top = [activation(ex, TOP_BIN, _num(peak if peak is not None else ex.get("max", 0), 1), TOP_BIN, sign)
           for ex in view["top"]]
    out: dict[str, Any] = {
        "feature_index": int(rec["index"]),
        "neg_str": [clean(t["str"]) for t in down], "neg_values": [_num(t["value"], sign) for t in down],
        "pos_str": [clean(t["str"]) for t in up], "pos_values": [_num(t["value"], sign) for t in up],
        "frac_nonzero": float(view["density"] or 0.0),
        "freq_hist_data_bar_values": mids, "freq_hist_data_bar_heights": heights,
        "n_prompts_total": int(n_prompts), "n_tokens_in_prompt": int(n_tokens), "dataset": dataset,
        "activations": top + _bins(view, sign),
    }
    for key in EMPTY_LISTS:
        out[key] = []
    for key in ("pos_values", "neg_values", "frac_nonzero"):
        vals = out[key] if isinstance(out[key], list) else [out[key]]
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"`{key}` is not finite")
    return out


def active(rec: dict[str, Any], side: str) -> bool:
    """Whether a side of a record has anything to show (SAEDashboard skips dead features)."""
    view = side_view(rec, side)
    return view is not None and bool(view["top"])
