"""The "all at once" simulator of Bills et al. 2023, on an in-process model.

A fixed prompt (instructions, one worked example, the description) lists the context's tokens one
per line as `token<TAB><slot>`, every slot holding the placeholder "unknown". One forward pass
reads, at each slot, the model's next-token distribution over the label tokens (0-10, or 0-9 when
"10" is not one token); the prediction is the expected value, rescaled to 0-10. No generation, so
nothing to parse and nothing to misalign: one forward per scoring window (batched).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from tools.describe.client import Usage
from tools.describe.local import LocalLM, default_labels, label_ids
from tools.describe.simulators import Simulation

SEP = "\t"
PLACEHOLDER = "unknown"
MODE = "all_at_once"

_EXAMPLE = ([" The", " cat", " sat", " on", " the", " mat", ".", " A", " cat", " purred"],
            [0, 10, 0, 0, 0, 0, 0, 0, 8, 1])


def _show(s: str) -> str:
    """A token on one line: JSON escapes (newlines, tabs) without the quotes."""
    return json.dumps(s, ensure_ascii=False)[1:-1]


class AllAtOnceSimulator:
    def __init__(self, lm: LocalLM, labels: list[str] | None = None):
        self.lm = lm
        self.labels = labels or default_labels(lm.tokenizer, SEP)
        self.ids = label_ids(lm.tokenizer, self.labels, SEP)
        top = len(self.labels) - 1
        self.values = torch.tensor([10.0 * k / top for k in range(len(self.labels))])
        self.sep_ids = lm.encode(SEP)
        self.slot_ids = lm.encode(PLACEHOLDER)
        self.nl_ids = lm.encode("\n")

    def _head(self, description: str) -> list[int]:
        top = self.labels[-1]
        ex_strs, ex_vals = _EXAMPLE
        scale = (len(self.labels) - 1) / 10
        example = "".join(f"{_show(s)}{SEP}{self.labels[round(v * scale)]}\n"
                          for s, v in zip(ex_strs, ex_vals, strict=True))
        text = (
            "We study units (neurons or features) of a language model. Each unit looks for some particular "
            "thing in a short text. Given an explanation of what a unit does, predict its activation on "
            f"each token, from {self.labels[0]} (not active) to {top} (most active). Most activations "
            f"are {self.labels[0]}.\n\n"
            "Unit 1\nExplanation of unit 1 behavior: fires on the word \"cat\".\nActivations:\n<start>\n"
            f"{example}<end>\n\n"
            f"Unit 2\nExplanation of unit 2 behavior: {' '.join(description.split())}\n"
            "Activations:\n<start>\n"
        )
        return self.lm.encode(text)

    def body(self, strs: list[str]) -> tuple[list[int], list[int]]:
        """A context's lines after the prompt head, and per token the index whose next token is its label."""
        ids: list[int] = []
        slots = []
        for s in strs:
            ids += self.lm.encode(_show(s)) + self.sep_ids
            slots.append(len(ids) - 1)
            ids += self.slot_ids + self.nl_ids
        return ids, slots

    def __call__(self, description: str, contexts: list[list[str]], usage: Usage | None = None) -> Simulation:
        built = [self.body(strs) for strs in contexts]
        dists = self.lm.slot_distributions(self._head(description), [b[0] for b in built],
                                           [b[1] for b in built], self.ids, usage)
        preds = [[round(float(v), 4) for v in d @ self.values] for d in dists]
        return Simulation(list(preds), MODE)

    def describe(self) -> dict[str, Any]:
        return {"mode": MODE, "labels": self.labels}
