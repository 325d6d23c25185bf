"""The `pipeline` section (tools.pipeline only): which SAEs, unit sets and describe runs the plan holds.

Registered as `pipeline/schema` (conf/schema.py), so these defaults are the command line's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tools.core.config import UserError


@dataclass
class PipelineConfig:
    # Extra L1 coefficients to train (each gets its own SAE, features and site); empty = one SAE.
    sweep_l1_coeffs: list[float] = field(default_factory=list)
    describe: bool = True  # run the describe-and-score stage
    neurons: bool = True  # also analyse and describe the MLP's own neurons, for comparison
    # layers whose neurons are analysed and described (each its own site); null = [features.layer]
    neuron_layers: list[int] | None = None
    # Describe a random sample of this many alive units per side (SAE features, neurons) with an
    # in-process LLM explainer + all-at-once simulator, beside the baseline on the same units; 0 = off.
    llm_sample: int = 0
    llm_embedded: str | None = "smollm2-135m-instruct"  # the LLM: an embedded model ...
    llm_model: str | None = None  # ... or a hub name / folder (set llm_embedded to null)
    llm_threads: int | None = None  # torch CPU threads while the LLM describes (null = default)
    # describe.* settings for both sample runs (LLM and baseline, so both score the same windows),
    # e.g. {explain_top: 6, explain_max_tokens: 48}; the baseline ignores the LLM-only ones
    llm_overrides: dict[str, Any] = field(default_factory=dict)

    def check(self) -> PipelineConfig:
        if self.llm_sample < 0:
            raise UserError(f"config `pipeline.llm_sample`: must be >= 0, got {self.llm_sample}")
        if any(layer < 0 for layer in self.neuron_layers or []):
            raise UserError(f"config `pipeline.neuron_layers`: layers must be >= 0, got {self.neuron_layers}")
        return self
