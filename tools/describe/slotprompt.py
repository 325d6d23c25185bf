"""The "all at once" prompt of Bills et al. 2023, shared by the in-process simulator (allatonce.py)
and the server one (simulators.py, through /v1/completions with echo + logprobs).

Instructions, one worked example and the description, then the context's tokens one per line as
`token<TAB>unknown`: the model's next-token distribution at each "unknown" (the slot) over the
label tokens is the prediction for that token.
"""

from __future__ import annotations

import json

SEP = "\t"
PLACEHOLDER = "unknown"

EXAMPLE = ([" The", " cat", " sat", " on", " the", " mat", ".", " A", " cat", " purred"],
           [0, 10, 0, 0, 0, 0, 0, 0, 8, 1])


def show(s: str) -> str:
    """A token on one line: JSON escapes (newlines, tabs) without the quotes."""
    return json.dumps(s, ensure_ascii=False)[1:-1]


def head_text(description: str, labels: list[str]) -> str:
    """Everything before the first token line: instructions, the worked example, the description."""
    top = labels[-1]
    ex_strs, ex_vals = EXAMPLE
    scale = (len(labels) - 1) / 10
    example = "".join(f"{show(s)}{SEP}{labels[round(v * scale)]}\n"
                      for s, v in zip(ex_strs, ex_vals, strict=True))
    return (
        "We study units (neurons or features) of a language model. Each unit looks for some particular "
        "thing in a short text. Given an explanation of what a unit does, predict its activation on "
        f"each token, from {labels[0]} (not active) to {top} (most active). Most activations "
        f"are {labels[0]}.\n\n"
        "Unit 1\nExplanation of unit 1 behavior: fires on the word \"cat\".\nActivations:\n<start>\n"
        f"{example}<end>\n\n"
        f"Unit 2\nExplanation of unit 2 behavior: {' '.join(description.split())}\n"
        "Activations:\n<start>\n"
    )


def slot_prompt(description: str, strs: list[str], labels: list[str]) -> tuple[str, list[int]]:
    """The whole prompt as text, and the character offset of every token's placeholder in it."""
    parts = [head_text(description, labels)]
    at = len(parts[0])
    offsets = []
    for s in strs:
        line = show(s) + SEP
        offsets.append(at + len(line))
        line += PLACEHOLDER + "\n"
        parts.append(line)
        at += len(line)
    return "".join(parts), offsets
