"""Simulators: (description, context tokens) -> a predicted activation 0-10 on every token.

`baseline` reads the quoted strings of a description (`"x" (7.5)` fires on x, `the token after "x"`
on the token after x, weight 10 when none is given) and predicts by exact text match, so it can
also read a human's or an LLM's description that quotes tokens; a description with nothing
quoted is "not applicable" (a failure, never a score of zero). `llm` (LLMSimulator, any
OpenAI-compatible server) reads the prompt's logprobs at every token's slot (Bills et al. 2023's
all at once, through /v1/completions echo) when the server offers them, else asks for one
`index<TAB>value` line per token and takes each value's expected value over the top logprobs where
the value is one label token, the written value otherwise (tools/describe/answers.py).
Modes: "lexical", "all_at_once", "logprobs" (all expected values), "text" (written values only),
"mixed" (some of each, or contexts on different paths).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from tools.describe.answers import (
    DEFAULT_LABELS,
    check_labels,
    line_prompt,
    parse_lines,
    read_slots,
    value_evs,
)
from tools.describe.client import ChatClient, LogprobsUnsupported, MalformedResponse, Usage, content_of
from tools.describe.slotprompt import slot_prompt


@dataclass
class Simulation:
    preds: list[list[float] | None]  # one list per context, None where that context failed
    mode: str | None = None  # "lexical", "all_at_once", "logprobs", "text" or "mixed"
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
# LLM simulator (any OpenAI-compatible server)


class _Unusable(Exception):
    def __init__(self, reason: str, raw: str):
        super().__init__(reason)
        self.raw = raw


class LLMSimulator:
    """Per context: all at once through /v1/completions when the server returns the prompt's
    logprobs (probed once; `prompt_logprobs="auto"`), else one `index<TAB>value` line per token by
    chat, each value the expected value over the top logprobs where it is one label token."""

    def __init__(self, client: ChatClient, *, top_logprobs: int, labels: list[str] | None = None,
                 max_tokens_per_token: int = 8, prompt_logprobs: Any = "auto"):
        self.client = client
        self.top_logprobs = top_logprobs  # 0 disables logprobs (and the all-at-once path)
        self.labels = check_labels(labels) if labels else list(DEFAULT_LABELS)
        self.max_tokens_per_token = max_tokens_per_token
        self._chat_logprobs = bool(top_logprobs)  # switched off for good if the server refuses them
        # all at once: None = not known yet (probe on the first context), True, False
        self._echo: bool | None = None if top_logprobs and prompt_logprobs == "auto" else False
        self._probe = threading.Lock()

    @classmethod
    def from_config(cls, client: ChatClient, dc: Any) -> LLMSimulator:
        """From a DescribeConfig: top_logprobs, labels, simulate_max_tokens_per_token, prompt_logprobs."""
        return cls(client, top_logprobs=dc.top_logprobs, labels=dc.labels,
                   max_tokens_per_token=dc.simulate_max_tokens_per_token, prompt_logprobs=dc.prompt_logprobs)

    def _all_at_once(self, description: str, strs: list[str], usage: Usage | None) -> list[float] | None:
        """Predictions, or None when the server gives no prompt logprobs (then never asked again)."""
        if self._echo is False:
            return None
        prompt, offsets = slot_prompt(description, strs, self.labels)
        with self._probe if self._echo is None else contextlib.nullcontext():
            if self._echo is False:
                return None
            try:
                response = self.client.complete(
                    prompt, max_tokens=1, logprobs=self.top_logprobs, echo=True, usage=usage,
                    usable=lambda r: isinstance(read_slots(r, offsets, self.labels), list))
            except LogprobsUnsupported:
                self._echo = False
                return None
            got = read_slots(response, offsets, self.labels)
            self._echo = got is not None
        if got is None:
            return None
        if isinstance(got, str):
            raise _Unusable(got, json.dumps(response, ensure_ascii=False)[:2000])
        return got

    def _lines(self, description: str, strs: list[str], usage: Usage | None) -> tuple[list[float], str]:
        n = len(strs)
        messages = line_prompt(description, strs, self.labels)
        budget = 16 + self.max_tokens_per_token * n

        def usable(response: dict[str, Any]) -> bool:
            return not isinstance(parse_lines(content_of(response), n, self.labels), str)

        response = None
        if self._chat_logprobs:
            try:
                response = self.client.chat(messages, max_tokens=budget, top_logprobs=self.top_logprobs,
                                            usage=usage, usable=usable)
            except LogprobsUnsupported:
                self._chat_logprobs = False
        if response is None:
            response = self.client.chat(messages, max_tokens=budget, usage=usage, usable=usable)
        text = content_of(response)
        parsed = parse_lines(text, n, self.labels)
        if isinstance(parsed, str):
            if response["choices"][0].get("finish_reason") == "length" and "ends after" in parsed:
                parsed += f" (cut at max_tokens={budget}: describe.simulate_max_tokens_per_token)"
            raise _Unusable(parsed, text[:2000])
        values, spans = parsed
        evs = value_evs(response, text, spans, self.labels)
        top = len(self.labels) - 1
        preds = [10.0 * k / top if ev is None else ev for k, ev in zip(values, evs, strict=True)]
        used = sum(ev is not None for ev in evs)
        return preds, "logprobs" if used == n else "text" if used == 0 else "mixed"

    def __call__(self, description: str, contexts: list[list[str]], usage: Usage | None = None) -> Simulation:
        preds: list[list[float] | None] = []
        modes: set[str] = set()
        failures = []
        for c, strs in enumerate(contexts):
            try:
                row = self._all_at_once(description, strs, usage) if strs else []
                if row is not None:
                    mode = "all_at_once"
                else:
                    row, mode = self._lines(description, strs, usage)
            except (MalformedResponse, _Unusable) as e:
                preds.append(None)
                failures.append({"context": c, "reason": str(e), "raw": e.raw})
                continue
            preds.append([round(v, 4) for v in row])
            modes.add(mode)
        mode = "mixed" if len(modes) > 1 else (modes.pop() if modes else None)
        return Simulation(preds, mode, failures=failures)
