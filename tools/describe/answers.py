"""What the OpenAI-compatible simulator sends and how it reads the answers (no I/O here).

Line per token (chat): the prompt lists the tokens as `index<TAB>token` and asks for one line
`index<TAB>value` per token, values among the labels (0-9 by default: single tokens in every BPE and
SentencePiece vocabulary). `parse_lines` reads it token by token; `value_evs` finds, in the chat
`logprobs.content`, the returned token(s) covering each value and gives the expected value over the
top alternatives only when the value is exactly one token that is a label.

All at once (legacy completions with echo + logprobs): `read_slots` takes the distribution over the
labels among the top alternatives at each "unknown" placeholder of the prompt (slotprompt.py).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from typing import Any

from tools.core.config import UserError
from tools.describe.slotprompt import PLACEHOLDER

DEFAULT_LABELS = [str(i) for i in range(10)]

SIM_SYSTEM = (
    "You predict how strongly one unit of a language model activates on each token of a text "
    "excerpt, given a description of what the unit responds to. On most tokens the unit is not active."
)

_LINE = re.compile(r"[ \t]*(\d+)(?:[ \t]*[\t:][ \t]*|[ \t]+)(\S+)[ \t\r]*")


def line_prompt(description: str, strs: list[str], labels: list[str]) -> list[dict[str, str]]:
    """The chat messages asking for one `index<TAB>value` line per token."""
    lines = "\n".join(f"{i}\t{json.dumps(s, ensure_ascii=False)}" for i, s in enumerate(strs))
    lo, hi, n = labels[0], labels[-1], len(strs)
    return [
        {"role": "system", "content": SIM_SYSTEM},
        {"role": "user", "content": (
            f"Description of the unit: {' '.join(description.split())}\n\n"
            f"Tokens, one per line as index<TAB>token (JSON-escaped):\n{lines}\n\n"
            f"Activation values, from {lo} (not active) to {hi} (maximally active): {', '.join(labels)}\n"
            f"Reply with exactly {n} lines, one per token in order: the index (0 to {n - 1}), a TAB, and "
            "the activation value. Nothing else.")},
    ]


def check_labels(labels: list[str]) -> list[str]:
    """The labels as given; UserError when they cannot be written in `index<TAB>value` lines."""
    labels = [str(lab) for lab in labels]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise UserError(f"config `describe.labels`: need at least two distinct labels, got {labels!r}")
    bad = [lab for lab in labels if not lab or re.search(r"\s", lab)]
    if bad:
        raise UserError(f"config `describe.labels`: labels must be non-empty, without whitespace, "
                        f"got {bad[0]!r}")
    return labels


def parse_lines(text: str, n: int, labels: list[str]) -> tuple[list[int], list[tuple[int, int]]] | str:
    """Per token the label index and the character span of its value in `text`, or the reason the
    answer is unusable. Every index 0..n-1 must come once, in order; blank lines, surrounding
    whitespace and a code fence are ignored."""
    scale = {lab: k for k, lab in enumerate(labels)}
    values: list[int] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for lineno, line in enumerate((text or "").split("\n"), 1):
        start, at = at, at + len(line) + 1
        if not line.strip() or line.strip().startswith("```"):
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            return f"line {lineno}: expected index<TAB>value, got {line.strip()[:60]!r}"
        got, expected = int(m.group(1)), len(values)
        if expected >= n:
            return f"line {lineno}: index {got} after the last token (index {n - 1})"
        if got != expected:
            return f"line {lineno}: expected index {expected}, got {got}"
        if m.group(2) not in scale:
            return (f"line {lineno}: value {m.group(2)[:20]!r} of index {got} is not a label "
                    f"({labels[0]}..{labels[-1]})")
        values.append(scale[m.group(2)])
        spans.append((start + m.start(2), start + m.end(2)))
    if len(values) < n:
        return f"the answer ends after {len(values)} of {n} lines (missing index {len(values)})"
    return values, spans


def _ev(alternatives: list[tuple[str, Any]], labels: list[str]) -> float | None:
    """Expected value (0-10) over the alternatives whose stripped text is a label, renormalised."""
    scale = {lab: k for k, lab in enumerate(labels)}
    mass: dict[int, float] = {}
    for tok, lp in alternatives:
        k = scale.get(str(tok).strip())
        if k is not None and isinstance(lp, (int, float)) and math.isfinite(lp):
            mass[k] = mass.get(k, 0.0) + math.exp(lp)
    total = sum(mass.values())
    if total <= 0:
        return None
    top = len(labels) - 1
    return sum(10.0 * k / top * p for k, p in mass.items()) / total


def value_evs(response: dict[str, Any], text: str, spans: list[tuple[int, int]],
              labels: list[str]) -> list[float | None]:
    """Per value: the expected value (0-10) when it is exactly one returned token whose stripped text
    is a label, else None (use the written value). All None without logprobs, when the tokens do not
    spell the answer, or when a label is a prefix of another ("1" of "10") and the answer never shows
    the longer one as a single token (then p("1") may be the start of "10")."""
    none: list[float | None] = [None] * len(spans)
    content = (response["choices"][0].get("logprobs") or {}).get("content") or []
    toks = [str(item.get("token", "")) for item in content if isinstance(item, dict)]
    if len(toks) != len(content) or not toks:
        return none
    joined = "".join(toks)
    base = joined.find(text) if text else -1
    if base < 0:
        return none
    starts, at = [], -base
    for t in toks:
        starts.append(at)
        at += len(t)
    prefixes = {a for a in labels for b in labels if a != b and b.startswith(a)}
    whole_long = False
    out = list(none)
    for v, (a, b) in enumerate(spans):
        j = max(0, bisect.bisect_right(starts, a) - 1)
        covering = [i for i in range(j, len(toks)) if starts[i] < b and starts[i] + len(toks[i]) > a]
        if len(covering) != 1 or toks[covering[0]].strip() != text[a:b]:
            continue  # spread over several tokens (e.g. "1", "0"): the written value stands
        item = content[covering[0]]
        alts = [(alt.get("token", ""), alt.get("logprob")) for alt in item.get("top_logprobs") or []
                if isinstance(alt, dict)] or [(item.get("token", ""), item.get("logprob"))]
        out[v] = _ev(alts, labels)
        whole_long |= any(text[a:b] != p and text[a:b].startswith(p) for p in prefixes)
    if prefixes and not whole_long:
        return none
    return out


def read_slots(response: dict[str, Any], offsets: list[int], labels: list[str]) -> list[float] | str | None:
    """All-at-once predictions (0-10) from an echo + logprobs legacy completion: at each placeholder
    offset, the expected value over the labels among the top alternatives (a slot with none of them
    predicts 0, as in Bills et al.). None when the answer carries no logprobs over the prompt (the
    server ignored echo); a reason string when the placeholders cannot be found among its tokens."""
    choice = response["choices"][0]
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    tokens, tops = lp.get("tokens"), lp.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tops) != len(tokens) or not tokens:
        return None
    starts = lp.get("text_offset")
    if not isinstance(starts, list) or len(starts) != len(tokens):
        starts, at = [], 0
        for t in tokens:
            starts.append(at)
            at += len(str(t))
    if not offsets or starts[-1] < offsets[-1]:
        return None  # the tokens stop before the last slot: only the completion came back
    first: dict[int, int] = {}
    for j, o in enumerate(starts):
        first.setdefault(o, j)
    preds, labelled = [], 0
    for i, o in enumerate(offsets):
        j = first.get(o)
        if j is None or not str(tokens[j]) or not PLACEHOLDER.startswith(str(tokens[j])):
            near = str(tokens[max(0, bisect.bisect_right(starts, o) - 1)])
            return f"slot {i}: no prompt token starts at its placeholder (the token there is {near!r})"
        alts = tops[j] if isinstance(tops[j], dict) else {}
        ev = _ev(list(alts.items()), labels)
        labelled += ev is not None
        preds.append(0.0 if ev is None else ev)
    if not labelled:
        return f"no label among the top {len(tops[first[offsets[0]]] or {})} alternatives at any slot"
    return preds
