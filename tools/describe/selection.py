"""Candidate descriptions chosen on a validation split, as Transluce's neuron descriptions are.

With `describe.candidates` N > 1 each candidate is written from its own random subset of the
explanation exemplars (a function of seed, unit and candidate number), every candidate is simulated
on the validation windows, and the one with the best validation simulation_all is kept; the
record's scores are then measured on the test windows, which no candidate was chosen on. The test
score of the first candidate (an unselected one) is kept beside it, so the gain from selection is
measured on the same windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tools.describe.exemplars import Example, Split
from tools.describe.explainers import Explanation


@dataclass
class Candidate:
    explanation: Explanation
    exemplars: list[int]  # indices into split.explain that the explainer saw
    validation: dict[str, Any] | None = None  # scores on the validation windows (None: failed)

    @property
    def value(self) -> float:
        v = (self.validation or {}).get("simulation_all")
        return -math.inf if v is None else float(v)


def subset_size(n: int, size: int | None, minimum: int) -> int:
    """Exemplars per candidate: `size`, or two thirds of the n explanation exemplars (at least
    `minimum`, at most n)."""
    want = size if size is not None else math.ceil(2 * n / 3)
    return max(1, min(n, max(want, minimum)))


def candidate_subsets(n: int, k: int, size: int, seed: list[int]) -> list[list[int]]:
    """k sorted subsets of range(n) of the given size, distinct while enough distinct ones exist."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    for _ in range(k):
        pick: list[int] = []
        for _attempt in range(20):
            pick = sorted(int(i) for i in rng.choice(n, size=size, replace=False))
            if pick not in out:
                break
        out.append(pick)
    return out


def choose(split: Split, subsets: list[list[int]], explain: Callable[[list[Example], int], Explanation],
           rate: Callable[[str, list[tuple[str, Example]]], dict[str, Any] | None]
           ) -> tuple[Explanation, list[Candidate]]:
    """Write one candidate per subset (`explain(exemplars, k)`), rate each on the validation windows
    (`rate(description, windows)`), and return the best with every candidate; the first wins ties.
    When no candidate could be written, the first one's failure is returned."""
    cands = [Candidate(explain([split.explain[i] for i in sub], k), sub) for k, sub in enumerate(subsets)]
    for c in cands:
        if c.explanation.ok:
            assert c.explanation.description is not None
            c.validation = rate(c.explanation.description, split.validation)
    written = [c for c in cands if c.explanation.ok]
    if not written:
        return cands[0].explanation, cands
    best = max(written, key=lambda c: c.value)  # max keeps the first of equal values
    return best.explanation, cands


def candidate_records(cands: list[Candidate], split: Split, chosen: Explanation) -> list[dict[str, Any]]:
    """What descriptions.jsonl keeps of each candidate."""
    return [{"description": c.explanation.description, "reason": c.explanation.reason,
             "exemplars": [split.explain[i]["ctx"] for i in c.exemplars],
             "validation": c.validation, "chosen": c.explanation is chosen} for c in cands]
