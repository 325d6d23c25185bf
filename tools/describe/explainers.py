"""Explainers: a unit's explanation exemplars -> a one-line description.

`baseline` (offline) ranks tokens, previous tokens and token pairs by how much more often the unit
is active on them than on the other positions of its exemplars (lift), picks a few that together
cover the activations, and writes them as a readable sentence whose quoted strings the lexical
simulator can read back. `llm` shows a model the exemplars with active spans marked `<<...>>` and
activations scaled 0-10, in the style of Bills et al. 2023 ("Language models can explain neurons
in language models"), and asks for one sentence.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tools.describe.client import ChatClient, MalformedResponse, Usage, content_of
from tools.describe.exemplars import Example


@dataclass
class Explanation:
    description: str | None  # None when the explainer failed
    explainer: str
    prompt_hash: str
    tokens: list[dict[str, Any]] = field(default_factory=list)  # baseline: the machine-readable list
    candidates: list[dict[str, Any]] | None = None  # llm with candidates > 1: each and its selection score
    reason: str | None = None
    raw: str | None = None

    @property
    def ok(self) -> bool:
        return self.description is not None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def format_item(kind: str, text: str, weight: float) -> str:
    """One entry of a baseline description: `"x" (7.5)` or `the token after "x" (3.0)`."""
    lit = json.dumps(text, ensure_ascii=False)
    return f"{'the token after ' if kind == 'after' else ''}{lit} ({weight:g})"


def explain_baseline(
    explain: list[Example],
    background: list[Example],
    *,
    fire_frac: float = 0.3,
    min_count: int = 2,
    max_items: int = 6,
    coverage: float = 0.95,
) -> Explanation:
    """Greedy lift-ranked cover of the active positions by token / after-token / pair keys."""
    params = {"fire_frac": fire_frac, "min_count": min_count, "max_items": max_items, "coverage": coverage}
    prompt_hash = _hash({"explainer": "baseline", "params": params,
                         "ctx": [e["ctx"] for e in explain + background]})
    max_act = max((max(e["acts"]) for e in explain), default=0.0)
    if max_act <= 0:
        return Explanation(None, "baseline", prompt_hash, reason="no positive activation in the "
                           "explanation exemplars")
    threshold = fire_frac * max_act
    n_all = n_active = 0
    count: dict[tuple[str, str], int] = defaultdict(int)
    act_sum: dict[tuple[str, str], float] = defaultdict(float)
    covers: dict[tuple[str, str], set[tuple[int, int]]] = defaultdict(set)
    for e, ex in enumerate(explain + background):
        strs, acts = ex["strs"], ex["acts"]
        for i, (s, a) in enumerate(zip(strs, acts, strict=True)):
            keys = [("token", s)]
            if i > 0:
                keys += [("after", strs[i - 1]), ("pair", strs[i - 1] + s)]
            active = a >= threshold
            n_all += 1
            n_active += active
            for k in keys:
                if not k[1].strip():
                    continue  # whitespace-only text is not something a reader can match reliably
                count[k] += 1
                act_sum[k] += max(float(a), 0.0)
                if active:
                    covers[k].add((e, i))
    base_rate = n_active / max(n_all, 1)
    kind_rank = {"token": 0, "after": 1, "pair": 2}
    candidates = [k for k in covers if len(covers[k]) >= min_count]
    # Smoothed precision (one phantom inactive occurrence) keeps rare keys from winning on luck.
    precision = {k: len(covers[k]) / (count[k] + 1) for k in candidates}
    candidates.sort(key=lambda k: (-round(precision[k], 2), kind_rank[k[0]], -len(covers[k]), k[1]))
    chosen: list[dict[str, Any]] = []
    covered: set[tuple[int, int]] = set()
    for k in candidates:
        if len(chosen) >= max_items or len(covered) >= coverage * n_active:
            break
        new = covers[k] - covered
        if len(new) < min_count or precision[k] <= base_rate:
            continue
        covered |= covers[k]
        weight = round(10 * act_sum[k] / count[k] / max_act, 1)
        chosen.append({"kind": k[0], "str": k[1], "weight": weight, "count": count[k],
                       "active": len(covers[k]), "lift": round(precision[k] / max(base_rate, 1e-9), 2)})
    if not chosen:
        return Explanation(None, "baseline", prompt_hash, reason="no token, previous token or pair is "
                           f"active at least {min_count} times more often than background")
    text = "Fires on " + ", ".join(format_item(c["kind"], c["str"], c["weight"]) for c in chosen)
    share = len(covered) / max(n_active, 1)
    text += f" (covers {share:.0%} of active tokens)."
    return Explanation(text, "baseline", prompt_hash, tokens=chosen)


# ---------------------------------------------------------------------------------------------
# LLM explainer

EXPLAIN_SYSTEM = (
    "You are studying one unit (a neuron or a sparse-autoencoder feature) of a language model. You "
    "will see text excerpts. Tokens where the unit is active are marked <<like this>>, and after each "
    "excerpt the active tokens are listed with their activation on a 0-10 scale (10 = the strongest "
    "activation seen). Work out what the unit responds to: which tokens, and in which context. "
    "Answer with exactly one short sentence, in the form:\nExplanation: <sentence>"
)


def scale(acts: list[float], max_act: float) -> list[int]:
    """Activations as integers 0-10 relative to the unit's largest explanation activation."""
    if max_act <= 0:
        return [0] * len(acts)
    return [int(min(10, max(0, round(10 * a / max_act)))) for a in acts]


def mark_spans(strs: list[str], levels: list[int]) -> str:
    """Join tokens, wrapping each run of active tokens (level >= 1) in << >>."""
    out, inside = [], False
    for s, v in zip(strs, levels, strict=True):
        if v >= 1 and not inside:
            out.append("<<")
            inside = True
        elif v < 1 and inside:
            out.append(">>")
            inside = False
        out.append(s)
    if inside:
        out.append(">>")
    return "".join(out)


def explain_prompt(explain: list[Example]) -> list[dict[str, str]]:
    max_act = max((max(e["acts"]) for e in explain), default=0.0)
    parts = []
    for n, ex in enumerate(explain, 1):
        levels = scale(ex["acts"], max_act)
        listed = ", ".join(f"{json.dumps(s, ensure_ascii=False)} {v}"
                           for s, v in zip(ex["strs"], levels, strict=True) if v >= 1)
        parts.append(f"Excerpt {n}: {mark_spans(ex['strs'], levels)}\nActive tokens: {listed or 'none'}")
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "\n\n".join(parts) + "\n\nWhat does this unit respond to?"}]


_REFUSALS = ("i cannot", "i can't", "i'm sorry", "i am sorry", "as an ai")


def parse_explanation(text: str, max_chars: int = 400) -> str | None:
    """The sentence after the last `Explanation:` (or the first non-empty line), or None if unusable."""
    if not isinstance(text, str):
        return None
    found = list(re.finditer(r"explanation\s*:", text, flags=re.IGNORECASE))
    body = text[found[-1].end():] if found else text
    body = re.sub(r"<think>.*?</think>", " ", body, flags=re.DOTALL)  # reasoning models' scratchpad
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    if not lines:
        return None
    sentence = " ".join(lines[0].replace("**", "").split()).strip(" \"'`*")
    if not sentence or len(sentence) > max_chars or sentence.lower().startswith(_REFUSALS):
        return None
    if not re.search(r"[A-Za-z]", sentence):
        return None
    return sentence


def explain_llm(client: ChatClient, explain: list[Example], *, max_tokens: int, temperature: float,
                usage: Usage | None = None, seed: int | None = None) -> Explanation:
    messages = explain_prompt(explain)
    prompt_hash = _hash(messages)
    try:
        response = client.chat(messages, max_tokens=max_tokens, temperature=temperature, usage=usage,
                               usable=lambda r: parse_explanation(content_of(r)) is not None, seed=seed)
    except MalformedResponse as e:
        return Explanation(None, "llm", prompt_hash, reason=str(e), raw=e.raw)
    text = content_of(response)
    sentence = parse_explanation(text)
    if sentence is None:
        return Explanation(None, "llm", prompt_hash, reason="explainer answer has no usable sentence",
                           raw=text[:2000])
    return Explanation(sentence, "llm", prompt_hash, raw=None)
