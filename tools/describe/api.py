"""Describe and score one unit from Python, without a run folder:

    from tools.describe.api import describe_unit, load_local
    record = describe_unit(unit)                          # baseline explainer + lexical simulator
    lm = load_local(embedded="smollm2-135m-instruct")     # or model="meta-llama/Llama-3.1-8B-Instruct"
    record = describe_unit(unit, lm=lm)                   # LLM explainer + all-at-once simulator
    print(record["description"], record["scores"])

`unit` is one line of features.jsonl (docs/formats.md: `top`, `quantiles`, `random` exemplars);
the record is what the stage writes to descriptions.jsonl (description, scores, controls when an
`other` description is given, exemplar counts, usage).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tools.describe.client import Usage
from tools.describe.describer import Describer
from tools.describe.local import LocalLM, LocalModelConfig


def load_local(*, model: str | None = None, embedded: str | None = None, device: str = "cpu",
               data_dir: str = "data", labels: list[str] | None = None) -> tuple[LocalLM, Any]:
    """An in-process chat model and its all-at-once simulator (labels checked to be single tokens)."""
    from tools.describe.allatonce import AllAtOnceSimulator

    lm = LocalLM(LocalModelConfig(model=model, embedded=embedded, device=device, data_dir=data_dir))
    return lm, AllAtOnceSimulator(lm, labels)


def describe_unit(unit: dict[str, Any], *, lm: tuple[LocalLM, Any] | None = None, seed: int = 0,
                  other: str | None = None, **settings: Any) -> dict[str, Any]:
    """Split, explain, simulate and score one unit; `settings` are describe.* keys (explain_top, ...).
    `other`: another unit's description, scored on this unit's windows as the random control."""
    from tools.describe.config import DescribeConfig  # the stage's own defaults

    dc = replace(DescribeConfig(seed=seed, controls=True), **settings)
    if lm is not None:
        dc = replace(dc, explainer="llm", simulator="llm", backend="local", model=lm[0].lc.name())
    describer = Describer(dc, lm[0] if lm else None, "api", llm_sim=lm[1] if lm else None)
    split = describer.split(unit)
    usage = Usage()
    rec = describer.base_record(int(unit["index"]))
    reason = describer.skip_reason(unit, split)
    if reason is not None:
        return {**rec, "status": "skipped", "reason": reason}
    expl = describer.explain(split, usage, int(unit["index"]))
    if not expl.ok:
        return {**rec, "status": "failed", "reason": expl.reason, "raw": expl.raw}
    rec = describer.score_unit(rec["index"], split, expl, (-1, other) if other else None, usage)
    rec["usage"] = usage.as_dict()
    return rec
