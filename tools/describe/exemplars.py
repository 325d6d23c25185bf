"""Split a unit's exemplars into what the explainer sees and what it is scored on.

Scoring on contexts the explainer saw inflates scores (delphi's defaults put 10-20 of 40 scoring
examples in the explainer's prompt), so the sets here are disjoint by context index: a scoring
window whose `ctx` also appears among the explanation windows is dropped, even when the windows
themselves do not overlap. With candidate selection (Transluce's recipe: several descriptions, the
best by simulation on a validation split, reported on a test split) the held-out windows are split
again, by context: every window of one context (a scanned passage) goes to one side only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

Example = dict[str, Any]


@dataclass
class Split:
    explain: list[Example]  # firing contexts shown to the explainer (top first, then quantile bins)
    background: list[Example]  # non-firing contexts the explainer may use as background
    score_top: list[Example]  # held-out top contexts
    score_quantile: list[Example]  # held-out quantile-bin contexts
    score_random: list[Example]  # held-out non-firing contexts (negatives)
    dropped: int = 0  # scoring windows dropped because the explainer saw their context
    notes: list[str] = field(default_factory=list)
    max_act: float | None = None  # the unit's max activation over the scan (for the detection label)
    score_uniform: list[Example] = field(default_factory=list)  # windows drawn uniformly from held-out text
    density: float | None = None  # fraction of scanned tokens where the unit fired (features stage)
    validation: list[tuple[str, Example]] = field(default_factory=list)  # (kind, window), selection only
    act_quantiles: list[float | None] | None = None  # the unit's activation quantiles (features stage)

    @property
    def score_firing(self) -> list[Example]:
        return self.score_top + self.score_quantile

    def scoring(self) -> list[tuple[str, Example]]:
        """Every scoring (test) window with its kind, in a fixed order; `validation` holds the rest."""
        return (
            [("top", e) for e in self.score_top]
            + [("quantile", e) for e in self.score_quantile]
            + [("random", e) for e in self.score_random]
            + [("uniform", e) for e in self.score_uniform]
        )


def split_validation(split: Split) -> Split:
    """Move about half of the held-out windows to `validation`, by context: within each kind the
    contexts alternate test, validation, test, ... in the split's order (so both sides get strong
    and weak top windows), and a window whose context is already on one side goes to that side.
    No window is on two sides, and no context has windows on both."""
    side: dict[int, str] = {}
    out: dict[str, list[Example]] = {"top": [], "quantile": [], "random": [], "uniform": []}
    validation: list[tuple[str, Example]] = []
    for kind, group in (("top", split.score_top), ("quantile", split.score_quantile),
                        ("random", split.score_random), ("uniform", split.score_uniform)):
        turn = 0
        for ex in group:
            if ex["ctx"] not in side:
                side[ex["ctx"]] = "test" if turn % 2 == 0 else "validation"
                turn += 1
            if side[ex["ctx"]] == "test":
                out[kind].append(ex)
            else:
                validation.append((kind, ex))
    return replace(split, score_top=out["top"], score_quantile=out["quantile"], score_random=out["random"],
                   score_uniform=out["uniform"], validation=validation)


def check_example(ex: Any, where: str) -> Example:
    """An Example as docs/formats.md pins it; anything else is bad input naming the place."""
    if not isinstance(ex, dict):
        raise ValueError(f"{where}: expected an object, got {type(ex).__name__}")
    for key in ("ctx", "strs", "acts"):
        if key not in ex:
            raise ValueError(f"{where}: missing key `{key}`")
    strs, acts = ex["strs"], ex["acts"]
    if not isinstance(strs, list) or not all(isinstance(s, str) for s in strs):
        raise ValueError(f"{where}: `strs` must be a list of strings")
    if not isinstance(acts, list) or not all(isinstance(a, (int, float)) for a in acts):
        raise ValueError(f"{where}: `acts` must be a list of numbers")
    if len(strs) != len(acts) or not strs:
        raise ValueError(f"{where}: `strs` and `acts` must be non-empty and of equal length "
                         f"(got {len(strs)} and {len(acts)})")
    return ex


def _flip(ex: Example) -> Example:
    out = {k: v for k, v in ex.items() if k != "min"}
    out["acts"] = [-a for a in ex["acts"]]
    if "min" in ex:
        out["max"] = -ex["min"]
    return out


def negative_side(record: dict[str, Any]) -> dict[str, Any] | None:
    """A signed unit's negative side (features.jsonl `neg`) as a record of its own, activations
    negated so its strongest (most negative) tokens read as the largest: `bottom` becomes `top`,
    bins ascend by magnitude. None when the record has no negative side."""
    neg = record.get("neg")
    if not isinstance(neg, dict):
        return None
    bins = [{**q, "lo": -q["hi"], "hi": -q["lo"], "examples": [_flip(e) for e in q.get("examples") or []]}
            for q in reversed(neg.get("quantiles") or [])]
    min_act = neg.get("min_act")
    return {"index": record["index"], "density": neg.get("density"),
            "max_act": -min_act if isinstance(min_act, (int, float)) else None,
            "top": [_flip(e) for e in neg.get("bottom") or []], "quantiles": bins,
            "random": [_flip(e) for e in neg.get("random") or []],
            "uniform": [_flip(e) for e in record.get("uniform") or []],
            "act_quantiles": record.get("act_quantiles")}  # signed: the Describer reads them mirrored


def split_exemplars(
    record: dict[str, Any],
    *,
    explain_top: int,
    score_top: int,
    explain_per_bin: int,
    score_per_bin: int,
    explain_random: int,
    score_random: int,
    score_uniform: int = 0,
) -> Split:
    """Deterministic split: top contexts alternate (scoring takes ranks 1, 3, 5, ... so it is not
    left with only the weakest), each quantile bin alternates the same way, and random
    contexts go first to background, the rest to scoring; `uniform` windows (drawn uniformly from
    held-out text by the features stage, whatever the unit does there) are all for scoring."""
    top = list(record.get("top") or [])
    bins = [b.get("examples") or [] for b in (record.get("quantiles") or [])]
    rand = list(record.get("random") or [])

    s_top = top[1::2][:score_top]
    chosen = {id(e) for e in s_top}
    e_top = [e for e in top if id(e) not in chosen][:explain_top]
    e_q: list[Example] = []
    s_q: list[Example] = []
    for examples in bins:
        e_q += examples[0::2][:explain_per_bin]
        s_q += examples[1::2][:score_per_bin]
    background = rand[:explain_random]
    s_rand = rand[explain_random:][:score_random]

    explain = e_top + e_q
    seen = {e["ctx"] for e in explain} | {e["ctx"] for e in background}
    s_uni = list(record.get("uniform") or [])[:score_uniform]
    kept = [[e for e in group if e["ctx"] not in seen] for group in (s_top, s_q, s_rand, s_uni)]
    dropped = len(s_top) + len(s_q) + len(s_rand) + len(s_uni) - sum(len(g) for g in kept)
    max_act = record.get("max_act")
    density = record.get("density")
    quantiles = record.get("act_quantiles")
    return Split(explain, background, kept[0], kept[1], kept[2], dropped, score_uniform=kept[3],
                 max_act=float(max_act) if isinstance(max_act, (int, float)) else None,
                 density=float(density) if isinstance(density, (int, float)) else None,
                 act_quantiles=quantiles if isinstance(quantiles, list) else None)
