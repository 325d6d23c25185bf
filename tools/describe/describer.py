"""One unit: split its exemplars, explain, simulate the held-out contexts, score, and score the
controls beside it (another unit's description; the same description on the contexts' tokens
shuffled, predictions put back in each token's own place before scoring)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.describe.client import ChatClient, Usage
from tools.describe.exemplars import Split, negative_side, split_exemplars
from tools.describe.explainers import Explanation, explain_baseline, explain_llm
from tools.describe.scorers import SCORES, active_labels, score, with_failures_as_zero
from tools.describe.simulators import LLMSimulator, Simulation, simulate_baseline

if TYPE_CHECKING:
    from tools.describe.stage import DescribeConfig

DEFAULT_NEGATIVE_FRAC = 0.1  # features meta.json without `negative_frac` (older scans)


def model_name(dc: DescribeConfig) -> str:
    if not uses_llm(dc):
        return "baseline"
    return str(dc.embedded or dc.model) if dc.backend == "local" else str(dc.model)


def uses_llm(dc: DescribeConfig) -> bool:
    return "llm" in (dc.explainer, dc.simulator)



class Describer:
    """Explains and scores one unit. `client` is a ChatClient or a LocalLM (both answer `chat`);
    `llm_sim` is the simulator for simulator=llm (None = the lexical baseline)."""

    def __init__(self, dc: DescribeConfig, client: Any, config_hash_: str,
                 negative_frac: float = DEFAULT_NEGATIVE_FRAC, llm_sim: Any = None):
        self.dc, self.client, self.config_hash = dc, client, config_hash_
        self.negative_frac = negative_frac
        if llm_sim is None and dc.simulator == "llm" and isinstance(client, ChatClient):
            llm_sim = LLMSimulator(client, top_logprobs=dc.top_logprobs)
        self.llm_sim = llm_sim

    def side(self, unit: dict[str, Any]) -> dict[str, Any]:
        """The record to describe: the unit itself, or its negative side for polarity=neg."""
        if self.dc.polarity == "pos":
            return unit
        return negative_side(unit) or {"index": unit["index"]}

    def split(self, unit: dict[str, Any]) -> Split:
        d = self.dc
        return split_exemplars(self.side(unit), explain_top=d.explain_top, score_top=d.score_top,
                               explain_per_bin=d.explain_per_bin, score_per_bin=d.score_per_bin,
                               explain_random=d.explain_random, score_random=d.score_random,
                               score_uniform=d.score_uniform)

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
        return None

    def explain(self, split: Split, usage: Usage) -> Explanation:
        d = self.dc
        if d.explainer == "baseline":
            return explain_baseline(split.explain, split.background, fire_frac=d.fire_frac,
                                    min_count=d.min_count, max_items=d.max_items)
        assert self.client is not None
        if d.candidates == 1:
            return explain_llm(self.client, split.explain, max_tokens=d.explain_max_tokens,
                               temperature=d.temperature, usage=usage)
        cands = [explain_llm(self.client, split.explain, max_tokens=d.explain_max_tokens,
                             temperature=d.candidate_temperature, usage=usage, seed=d.seed + i)
                 for i in range(d.candidates)]
        ok = [c for c in cands if c.ok]
        if not ok:
            return cands[0]
        # Choose on the explanation exemplars, never on the held-out scoring contexts.
        kinds = ["top"] * len(split.explain)
        acts = [ex["acts"] for ex in split.explain]
        rated = []
        for c in ok:
            assert c.description is not None
            sim = self.simulate(c.description, [list(ex["strs"]) for ex in split.explain], usage)
            s = None if sim.not_applicable else score(kinds, acts, sim.preds, threshold=d.detection_threshold)
            rated.append((c, None if s is None else s["simulation_top"]))
        best = max(rated, key=lambda cr: -math.inf if cr[1] is None else cr[1])[0]
        best.candidates = [{"description": c.description, "selection_score": v} for c, v in rated]
        return best

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

    def run_simulation(self, description: str, split: Split, usage: Usage, shuffle_seed: list[int] | None
                       ) -> tuple[dict[str, Any] | None, Simulation]:
        """Scores of one description on the scoring contexts (tokens permuted when shuffle_seed)."""
        scoring = split.scoring()
        kinds = [k for k, _ in scoring]
        acts = [ex["acts"] for _, ex in scoring]
        contexts = [list(ex["strs"]) for _, ex in scoring]
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
        # "activates the unit": the features stage's negative rule, relative to the unit's max
        max_act = split.max_act if split.max_act is not None else max(max(a) for a in acts)
        active = active_labels(acts, max_act, self.negative_frac)
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
        scores, sim = self.run_simulation(expl.description, split, usage, None)
        rec["simulator_mode"] = sim.mode
        rec["failed_contexts"] = sum(p is None for p in sim.preds)
        if scores is None:
            first = sim.failures[0] if sim.failures else {}
            rec.update(status="failed", raw=first.get("raw"),
                       reason=sim.not_applicable or f"simulator failed on {rec['failed_contexts']} of "
                       f"{len(sim.preds)} contexts (first: {first.get('reason')})")
            return rec
        rec["scores"] = scores
        if self.dc.controls:
            controls: dict[str, Any] = {}
            if other is not None:
                c, _ = self.run_simulation(other[1], split, usage, None)
                controls["random_description"] = {**(c or dict.fromkeys(SCORES)), "from": other[0]}
            else:
                controls["random_description"] = None
            c, _ = self.run_simulation(expl.description, split, usage, [self.dc.seed, index, 1])
            controls["shuffled_tokens"] = c
            rec["controls"] = controls
        return rec


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
