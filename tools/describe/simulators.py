"""Simulators: (description, context tokens) -> a predicted activation 0-10 on every token.

`baseline` reads the quoted strings of a description (`"x" (7.5)` fires on x, `the token after "x"`
on the token after x, weight 10 when none is given) and predicts by exact text match, so it can
also read a human's or an LLM's description that quotes tokens; a description with nothing
quoted is "not applicable" (a failure, never a score of zero). `llm` asks a model for a JSON list
of per-token values; when the server returns logprobs each value is the expected value over the
top alternatives for that number (Bills et al. 2023), otherwise the listed integers are used.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from tools.describe.client import ChatClient, LogprobsUnsupported, MalformedResponse, Usage, content_of


@dataclass
class Simulation:
    preds: list[list[float] | None]  # one list per context, None where that context failed
    mode: str | None = None  # baseline: "lexical"; llm: "logprobs", "json" or "mixed"
    not_applicable: str | None = None  # set when the simulator cannot read the description at all
    failures: list[dict[str, Any]] = field(default_factory=list)  # per-context: index, reason, raw


# ---------------------------------------------------------------------------------------------
# Lexical simulator

_ITEM = re.compile(
    r'(?P<after>\bafter\s+)?(?P<lit>"(?:[^"\\]|\\.)*")(?:\s*\(\s*(?P<w>\d+(?:\.\d+)?)\s*\))?',
    flags=re.IGNORECASE,
)


def parse_items(description: str | None) -> list[tuple[str, str, float]]:
    """(kind, text, weight) for every quoted string; kind is "token" or "after"."""
    items = []
    for m in _ITEM.finditer(description or ""):
        try:
            text = json.loads(m.group("lit"))
        except json.JSONDecodeError:
            text = m.group("lit")[1:-1]
        if not isinstance(text, str) or not text.strip():
            continue
        weight = min(10.0, float(m.group("w"))) if m.group("w") else 10.0
        items.append(("after" if m.group("after") else "token", text, weight))
    return items


class _Matcher:
    """Does quoted text end exactly at token i, cover its visible text and start on a token boundary?"""

    def __init__(self, strs: list[str]):
        self.strs = strs
        self.full = "".join(strs)
        self.starts = [0]
        for s in strs:
            self.starts.append(self.starts[-1] + len(s))
        self.boundaries: set[int] = set()
        for j, s in enumerate(strs):
            lead = len(s) - len(s.lstrip())
            self.boundaries.update(range(self.starts[j], self.starts[j] + lead + 1))

    def ends_at(self, i: int, text: str) -> bool:
        if i < 0 or not self.strs[i].strip():
            return False
        target = text.strip()
        upto = self.full[: self.starts[i + 1]].rstrip()
        if not upto.endswith(target):
            return False
        begin = len(upto) - len(target)
        visible = self.starts[i] + len(self.strs[i]) - len(self.strs[i].lstrip())
        return begin <= visible and begin in self.boundaries


def simulate_baseline(description: str | None, contexts: list[list[str]]) -> Simulation:
    items = parse_items(description)
    if not items:
        return Simulation([None] * len(contexts), "lexical",
                          not_applicable="the lexical simulator found no quoted token in the description")
    preds = []
    for strs in contexts:
        m = _Matcher(strs)
        row = []
        for i in range(len(strs)):
            value = 0.0
            for kind, text, weight in items:
                if weight > value and m.ends_at(i - 1 if kind == "after" else i, text):
                    value = weight
            row.append(value)
        preds.append(row)
    return Simulation(preds, "lexical")


# ---------------------------------------------------------------------------------------------
# LLM simulator

SIM_SYSTEM = (
    "You predict how strongly one unit of a language model activates on each token of a text "
    "excerpt, given a description of what the unit responds to. Activations are integers from 0 "
    "(not active) to 10 (maximally active); on most tokens the unit is not active."
)


def simulate_prompt(description: str, strs: list[str]) -> list[dict[str, str]]:
    lines = "\n".join(f"{i}\t{json.dumps(s, ensure_ascii=False)}" for i, s in enumerate(strs))
    return [
        {"role": "system", "content": SIM_SYSTEM},
        {"role": "user", "content": (
            f"Description of the unit: {description}\n\nTokens, one per line as index<TAB>token:\n{lines}\n\n"
            f"Reply with only a JSON list of exactly {len(strs)} integers from 0 to 10: the activation on "
            "each token, in order.")},
    ]


def parse_values(text: str, n: int) -> list[float] | str:
    """The first JSON list of n numbers in the text (clipped to 0-10), or the reason it is unusable."""
    for m in re.finditer(r"\[[^\[\]]*\]", text or ""):
        try:
            values = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in values):
            continue
        if len(values) != n:
            return f"expected {n} values, got {len(values)}"
        return [float(min(10, max(0, v))) for v in values]
    return "no JSON list of numbers in the answer"


def expected_values(response: dict[str, Any]) -> tuple[list[int], list[float]]:
    """For each number 0-10 the model wrote: the integer and its expected value under top_logprobs."""
    logprobs = (response["choices"][0].get("logprobs") or {}).get("content") or []
    ints, evs = [], []
    for item in logprobs:
        tok = str(item.get("token", "")).strip()
        if not re.fullmatch(r"\d{1,2}", tok) or int(tok) > 10:
            continue
        mass: dict[int, float] = {}
        for alt in item.get("top_logprobs") or [item]:
            t = str(alt.get("token", "")).strip()
            lp = alt.get("logprob")
            if re.fullmatch(r"\d{1,2}", t) and int(t) <= 10 and isinstance(lp, (int, float)):
                mass[int(t)] = mass.get(int(t), 0.0) + math.exp(lp)
        total = sum(mass.values())
        ints.append(int(tok))
        evs.append(sum(v * p for v, p in mass.items()) / total if total > 0 else float(tok))
    return ints, evs


class LLMSimulator:
    def __init__(self, client: ChatClient, *, top_logprobs: int, max_tokens_per_value: int = 4):
        self.client = client
        self.top_logprobs = top_logprobs  # 0 disables; switched off for good if the server refuses
        self.max_tokens_per_value = max_tokens_per_value

    def _ask(self, messages: list[dict[str, str]], n: int, usage: Usage | None) -> dict[str, Any]:
        budget = 16 + self.max_tokens_per_value * n

        def usable(response: dict[str, Any]) -> bool:
            return not isinstance(parse_values(content_of(response), n), str)

        if self.top_logprobs:
            try:
                return self.client.chat(messages, max_tokens=budget, top_logprobs=self.top_logprobs,
                                        usage=usage, usable=usable)
            except LogprobsUnsupported:
                self.top_logprobs = 0
        return self.client.chat(messages, max_tokens=budget, usage=usage, usable=usable)

    def __call__(self, description: str, contexts: list[list[str]], usage: Usage | None = None) -> Simulation:
        preds: list[list[float] | None] = []
        modes: set[str] = set()
        failures = []
        for c, strs in enumerate(contexts):
            try:
                response = self._ask(simulate_prompt(description, strs), len(strs), usage)
            except MalformedResponse as e:
                preds.append(None)
                failures.append({"context": c, "reason": str(e), "raw": e.raw})
                continue
            text = content_of(response)
            values = parse_values(text, len(strs))
            if isinstance(values, str):
                preds.append(None)
                failures.append({"context": c, "reason": values, "raw": text[:2000]})
                continue
            ints, evs = expected_values(response)
            if len(ints) == len(values) and ints == [int(v) for v in values]:
                preds.append(evs)
                modes.add("logprobs")
            else:
                preds.append(values)
                modes.add("json")
        mode = "mixed" if len(modes) > 1 else (modes.pop() if modes else None)
        return Simulation(preds, mode, failures=failures)
