"""The "all at once" simulator of Bills et al. 2023, on an in-process model.

A fixed prompt (instructions, one worked example, the description) lists the context's tokens one
per line as `token<TAB><slot>`, every slot holding the placeholder "unknown". One forward pass
reads, at each slot, the model's next-token distribution over the label tokens (0-10, or 0-9 when
"10" is not one token); the prediction is the expected value, rescaled to 0-10. No generation, so
nothing to parse and nothing to misalign: one forward per scoring window (batched).
"""

from __future__ import annotations

from typing import Any

import torch

from tools.describe.client import Usage
from tools.describe.local import LocalLM, default_labels, label_ids
from tools.describe.simulators import Simulation
from tools.describe.slotprompt import PLACEHOLDER, SEP, head_text, show

MODE = "all_at_once"


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
        return self.lm.encode(head_text(description, self.labels))

    def body(self, strs: list[str]) -> tuple[list[int], list[int]]:
        """A context's lines after the prompt head, and per token the index whose next token is its label."""
        ids: list[int] = []
        slots = []
        for s in strs:
            ids += self.lm.encode(show(s)) + self.sep_ids
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
