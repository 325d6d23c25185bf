"""One unit: split its exemplars, explain, simulate the held-out contexts, score, and score the
controls beside it (another unit's description; the same description on the contexts' tokens
shuffled, predictions put back in each token's own place before scoring)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tools.describe.client import ChatClient, Usage
from tools.describe.config import uses_llm
from tools.describe.exemplars import Example, Split, negative_side, split_exemplars, split_validation
from tools.describe.explainers import Explanation, explain_baseline, explain_llm
from tools.describe.scorers import SCORES, score, with_failures_as_zero
from tools.describe.selection import candidate_records, candidate_subsets, choose, subset_size
from tools.describe.simulators import LLMSimulator, Simulation, simulate_baseline

if TYPE_CHECKING:
    from tools.describe.config import DescribeConfig

DEFAULT_NEGATIVE_FRAC = 0.1  # features meta.json without `negative_frac` (older scans)


def model_name(dc: DescribeConfig) -> str:
    if not uses_llm(dc):
        return "baseline"
    return str(dc.embedded or dc.model) if dc.backend == "local" else str(dc.model)



class Describer:
    """Explains and scores one unit. `client` is a ChatClient or a LocalLM (both answer `chat`);
    `llm_sim` is the simulator for simulator=llm (None = the lexical baseline)."""

    def __init__(self, dc: DescribeConfig, client: Any, config_hash_: str,
                 negative_frac: float = DEFAULT_NEGATIVE_FRAC, llm_sim: Any = None,
                 quantile_probs: list[float] | None = None):
        self.dc, self.client, self.config_hash = dc, client, config_hash_
        self.negative_frac = negative_frac
        self.quantile_probs = quantile_probs  # meta.json `act_quantiles`: the records' probabilities
        if llm_sim is None and dc.simulator == "llm" and isinstance(client, ChatClient):
            llm_sim = LLMSimulator.from_config(client, dc)
        self.llm_sim = llm_sim

    def side(self, unit: dict[str, Any]) -> dict[str, Any]:
        """The record to describe: the unit itself, or its negative side for polarity=neg."""
        if self.dc.polarity == "pos":
            return unit
        return negative_side(unit) or {"index": unit["index"]}

    def split(self, unit: dict[str, Any]) -> Split:
        d = self.dc
        split = split_exemplars(self.side(unit), explain_top=d.explain_top, score_top=d.score_top,
                                explain_per_bin=d.explain_per_bin, score_per_bin=d.score_per_bin,
                                explain_random=d.explain_random, score_random=d.score_random,
                                score_uniform=d.score_uniform)
        return split_validation(split) if d.candidates > 1 else split

    def skip_reason(self, unit: dict[str, Any], split: Split) -> str | None:
        d = self.dc
        if self.dc.polarity == "neg" and not unit.get("neg"):
            return "no negative side in features.jsonl (features.negative_side=true scans it)"
        if not self.side(unit).get("top"):
            return "the unit never fired in the scan (no top exemplars)"
        if len(split.explain) < d.min_explain:
            return f"only {len(split.explain)} explanation exemplars (describe.min_explain={d.min_explain})"
        if len(split.score_firing) < d.min_score_firing:
            return (f"only {len(split.score_firing)} held-out firing contexts "
                    f"(describe.min_score_firing={d.min_score_firing})")
        if len(split.score_random) < d.min_score_random:
            return (f"only {len(split.score_random)} held-out non-firing contexts "
                    f"(describe.min_score_random={d.min_score_random})")
        firing = sum(kind in ("top", "quantile") for kind, _ in split.validation)
        if d.candidates > 1 and firing < d.min_score_firing:
            return (f"only {firing} firing validation contexts for the three-way split "
                    f"(describe.min_score_firing={d.min_score_firing}; candidates={d.candidates})")
        return None

    def explain(self, split: Split, usage: Usage, index: int) -> Explanation:
        """One description, or with candidates > 1 the best of several on the validation windows."""
        d = self.dc
        if d.candidates == 1:
            return self._explain_one(split.explain, split.background, usage, d.temperature, None)
        size = subset_size(len(split.explain), d.candidate_exemplars, d.min_explain)
        subsets = candidate_subsets(len(split.explain), d.candidates, size, [d.seed, index, 7])

        def write(exemplars: list[Example], k: int) -> Explanation:
            return self._explain_one(exemplars, split.background, usage, d.candidate_temperature, d.seed + k)

        def rate(description: str, windows: list[tuple[str, Example]]) -> dict[str, Any] | None:
            return self.run_simulation(description, windows, split, usage, None)[0]

        best, cands = choose(split, subsets, write, rate)
        best.candidates = candidate_records(cands, split, best)
        return best

    def _explain_one(self, explain: list[Example], background: list[Example], usage: Usage,
                     temperature: float, seed: int | None) -> Explanation:
        d = self.dc
        if d.explainer == "baseline":
            return explain_baseline(explain, background, fire_frac=d.fire_frac, min_count=d.min_count,
                                    max_items=d.max_items)
        assert self.client is not None
        return explain_llm(self.client, explain, max_tokens=d.explain_max_tokens, temperature=temperature,
                           usage=usage, seed=seed)

    def simulate(self, description: str, contexts: list[list[str]], usage: Usage) -> Simulation:
        if self.llm_sim is None:
            return simulate_baseline(description, contexts)
        return self.llm_sim(description, contexts, usage)

    def base_record(self, index: int) -> dict[str, Any]:
        d = self.dc
        return {"index": index, "status": "ok", "description": None, "explainer": d.explainer,
                "simulator": d.simulator, "simulator_mode": None, "scores": None, "controls": None,
                "reason": None, "raw": None, "prompt_hash": None,
                "model": model_name(d), "seed": d.seed, "polarity": d.polarity,
                "config_hash": self.config_hash}

    def truth_threshold(self, split: Split) -> tuple[float, str]:
        """The activation a window's max must exceed to count as activating the unit (detection).
        The first of negative_frac x max_act (the features stage's rule for negatives), then the unit's
        own activation quantiles at `detection_quantiles` (features.jsonl `act_quantiles`), under which
        at least `detection_negatives` of the unit's uniform windows fall: SAE features keep the first
        (their uniform windows are mostly silent), a GELU neuron, active a little on most tokens, gets
        a quantile. Returns the threshold and the rule in words."""
        d = self.dc
        max_act = split.max_act if split.max_act is not None else max(
            (max(ex["acts"]) for _, ex in split.scoring()), default=0.0)
        ladder = [(self.negative_frac * max(max_act, 0.0), f"{self.negative_frac:g} x max_act")]
        for p in d.detection_quantiles:
            q = self._side_quantile(split, p)
            if q is not None and q > ladder[-1][0]:
                ladder.append((q, f"q{p:g}"))
        uniform = [max(ex["acts"]) for ex in split.score_uniform]
        uniform += [max(ex["acts"]) for kind, ex in split.validation if kind == "uniform"]
        if not uniform:
            return ladder[0]
        for thr, rule in ladder:
            if sum(m <= thr for m in uniform) >= d.detection_negatives * len(uniform):
                return thr, rule
        return ladder[-1]

    def _side_quantile(self, split: Split, p: float) -> float | None:
        """The activation quantile p of this side: q(p) for pos, -q(1 - p) of the signed unit for neg."""
        probs, values = self.quantile_probs, split.act_quantiles
        if not probs or not values or len(probs) != len(values):
            return None
        want = p if self.dc.polarity == "pos" else 1.0 - p
        hit = [v for q, v in zip(probs, values, strict=True) if abs(q - want) < 1e-9]
        if not hit or not isinstance(hit[0], (int, float)):
            return None
        return float(hit[0]) if self.dc.polarity == "pos" else -float(hit[0])

    def run_simulation(self, description: str, windows: list[tuple[str, Example]], split: Split, usage: Usage,
                       shuffle_seed: list[int] | None) -> tuple[dict[str, Any] | None, Simulation]:
        """Scores of one description on (kind, window) pairs (tokens permuted when shuffle_seed)."""
        kinds = [k for k, _ in windows]
        acts = [ex["acts"] for _, ex in windows]
        contexts = [list(ex["strs"]) for _, ex in windows]
        perms = None
        if shuffle_seed is not None:
            rng = np.random.default_rng(shuffle_seed)
            perms = [rng.permutation(len(strs)) for strs in contexts]
            contexts = [[strs[j] for j in perm] for strs, perm in zip(contexts, perms, strict=True)]
        sim = self.simulate(description, contexts, usage)
        if perms is not None:  # each prediction back to its token's own position before scoring
            sim.preds = [None if p is None else unpermute(p, perm)
                         for p, perm in zip(sim.preds, perms, strict=True)]
        failed = sum(p is None for p in sim.preds)
        if sim.not_applicable or failed * 2 > len(contexts):
            return None, sim
        truth, _ = self.truth_threshold(split)
        active = [max(a) > truth for a in acts]
        thr = self.dc.detection_threshold
        out = score(kinds, acts, sim.preds, threshold=thr, active=active)
        zeros = with_failures_as_zero(sim.preds, [len(a) for a in acts])
        out["simulation_all_failed_as_zero"] = score(kinds, acts, zeros, threshold=thr)["simulation_all"]
        return out, sim

    def score_unit(self, index: int, split: Split, expl: Explanation, other: tuple[int, str] | None,
                   usage: Usage) -> dict[str, Any]:
        rec = self.base_record(index)
        rec.update(description=expl.description, prompt_hash=expl.prompt_hash, tokens=expl.tokens or None,
                   exemplars=exemplar_counts(split), density=split.density)
        if expl.candidates:
            rec["candidates"] = expl.candidates
        assert expl.description is not None
        test = split.scoring()
        scores, sim = self.run_simulation(expl.description, test, split, usage, None)
        truth, rule = self.truth_threshold(split)
        rec["detection_truth"] = {"threshold": round(truth, 6), "rule": rule}
        rec["simulator_mode"] = sim.mode
        rec["failed_contexts"] = sum(p is None for p in sim.preds)
        if scores is None:
            first = sim.failures[0] if sim.failures else {}
            rec.update(status="failed", raw=first.get("raw"),
                       reason=sim.not_applicable or f"simulator failed on {rec['failed_contexts']} of "
                       f"{len(sim.preds)} contexts (first: {first.get('reason')})")
            return rec
        rec["scores"] = scores
        if expl.candidates:
            rec["selection"] = self._selection(expl, test, split, scores, usage)
        if self.dc.controls:
            controls: dict[str, Any] = {}
            if other is not None:
                c, _ = self.run_simulation(other[1], test, split, usage, None)
                controls["random_description"] = {**(c or dict.fromkeys(SCORES)), "from": other[0]}
            else:
                controls["random_description"] = None
            c, _ = self.run_simulation(expl.description, test, split, usage, [self.dc.seed, index, 1])
            controls["shuffled_tokens"] = c
            rec["controls"] = controls
        return rec


    def _selection(self, expl: Explanation, test: list[tuple[str, Example]], split: Split,
                   scores: dict[str, Any], usage: Usage) -> dict[str, Any]:
        """Which candidate won, its validation score, and the first candidate's test score (an
        unselected candidate on the same test windows: the gain from selection, like for like)."""
        cands = expl.candidates or []
        chosen = next(k for k, c in enumerate(cands) if c["chosen"])
        first = cands[0]
        if chosen == 0:
            first_test = scores.get("simulation_all")
        elif first["description"] is None:
            first_test = None
        else:
            s, _ = self.run_simulation(first["description"], test, split, usage, None)
            first_test = None if s is None else s.get("simulation_all")
        return {"candidates": len(cands), "chosen": chosen,
                "validation_windows": len(split.validation),
                "validation_simulation_all": (cands[chosen]["validation"] or {}).get("simulation_all"),
                "first_candidate_test_simulation_all": first_test}


def unpermute(values: list[float], perm: np.ndarray) -> list[float]:
    """values[j] belongs to original position perm[j]: the list in original order."""
    out = [0.0] * len(values)
    for j, p in enumerate(perm):
        out[int(p)] = values[j]
    return out


def exemplar_counts(split: Split) -> dict[str, int]:
    return {"explain": len(split.explain), "background": len(split.background),
            "score_top": len(split.score_top), "score_quantile": len(split.score_quantile),
            "score_random": len(split.score_random), "score_uniform": len(split.score_uniform),
            "dropped_overlap": split.dropped}


def pick_other(pool: dict[int, str], index: int, seed: int) -> tuple[int, str] | None:
    others = sorted(k for k in pool if k != index)
    if not others:
        return None
    k = others[int(np.random.default_rng([seed, index]).integers(len(others)))]
    return k, pool[k]
