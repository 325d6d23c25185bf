"""The describe stage's settings (`describe.*`, conf/describe/*.yaml), validated once at start-up.

Fields marked `neutral` change how descriptions are fetched or where they go (server, retries,
caching, threads, folder tag), not what they say, so a run's `config_hash` leaves them out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tools.core.config import UserError, neutral


@dataclass
class DescribeConfig:
    explainer: str = "baseline"  # baseline | llm
    simulator: str = "baseline"  # baseline | llm
    # describe only the first N units of features.jsonl (None = all); summary.json records it
    max_units: int | None = neutral(None)
    # exemplar split (see tools/describe/exemplars.py)
    explain_top: int = 10
    score_top: int = 5
    explain_per_bin: int = 1
    score_per_bin: int = 1
    explain_random: int = 2  # non-firing contexts the explainer may use as background
    score_random: int = 0  # 0: uniform windows are the negatives of every unit alike (see baseline.yaml)
    min_explain: int = 3  # fewer explanation exemplars than this -> unit skipped
    min_score_firing: int = 2
    # fewer held-out negatives -> unit skipped; 0 keeps units without negatives (no detection score):
    # GELU neurons rarely stay below negative_frac x max over a whole context
    min_score_random: int = 0
    # baseline explainer
    fire_frac: float = 0.3  # a position is "active" at >= this fraction of the unit's max activation
    min_count: int = 2
    max_items: int = 6
    # scoring
    detection_threshold: float = 1.0  # a context is predicted active if a simulated value (0-10) >= this
    controls: bool = True
    seed: int | None = None  # None = the top-level seed
    overwrite: bool = neutral(False)  # discard existing descriptions for this unit set
    retry_failed: bool = neutral(False)  # redo units recorded as failed
    site: bool = neutral(True)  # re-render the feature browser (tools.html.site) with the descriptions
    # units read from features.jsonl and described at a time (bounds memory); hashed: the
    # random-description control draws within a chunk
    chunk_units: int = 256
    # LLM (explainer=llm or simulator=llm)
    base_url: str | None = neutral(None)
    model: str | None = None
    api_key_env: str = neutral("OPENAI_API_KEY")  # the key is read from this environment variable only
    timeout: float = neutral(60.0)
    max_retries: int = neutral(5)
    backoff: float = neutral(1.0)  # seconds; doubled each retry (with jitter), Retry-After wins when larger
    concurrency: int = neutral(4)
    temperature: float = 0.0
    explain_max_tokens: int = 120
    # candidates > 1: Transluce-style selection. Each candidate is written from its own random subset of
    # the explanation exemplars, the best by simulation_all on a validation split is kept, and scores are
    # measured on the test split (held-out windows split again by context; see exemplars.split_validation)
    candidates: int = 1
    candidate_exemplars: int | None = None  # exemplars per candidate (None = two thirds of them)
    candidate_temperature: float = 0.7  # llm explainer's sampling temperature for candidates
    # detection truth: a window activates the unit when its max exceeds the first of negative_frac x
    # max_act and the unit's activation quantiles at these probabilities (features `act_quantiles`) under
    # which at least `detection_negatives` of its uniform windows fall (so every unit has negatives)
    detection_quantiles: list[float] = field(default_factory=lambda: [0.99, 0.999])
    detection_negatives: float = 0.2
    top_logprobs: int = 5  # 0 = never ask for logprobs
    # openai simulator: answer budget per token of a line-per-token answer (`index<TAB>value\n` is 3-6
    # tokens); all at once via /v1/completions echo + logprobs: auto = probe the server once, false = never
    simulate_max_tokens_per_token: int = 8
    prompt_logprobs: Any = "auto"  # auto | false
    cache: bool = neutral(True)
    # LLM backend: openai (any OpenAI-compatible server at base_url) | local (in-process transformers,
    # named like a subject: `embedded` or `model` = hub name or folder; all-at-once simulator)
    backend: str = "openai"
    embedded: str | None = None  # local: an embedded model (smollm2-135m-instruct)
    dtype: str = "auto"  # local: auto = bfloat16 on CUDA, float32 on CPU
    device: str | None = neutral(None)  # local: null = the top-level device
    # simulator labels; null = local: 0-10, or 0-9 if "10" is not one token; openai: 0-9
    labels: list[str] | None = None
    batch_tokens: int = neutral(8192)  # local simulator: padded tokens per forward
    # local: torch CPU threads while describing (1 is far faster on a busy CPU)
    threads: int | None = neutral(None)
    score_uniform: int = 10  # windows drawn uniformly from held-out text (features `uniform`), scored
    # which units: `sample` picks N at random among alive units (a function of seed and the unit set);
    # `units` a list of indices or a file of them (one per line or a JSON list); null = all
    sample: int | None = None
    units: Any = None
    # pos: the unit's positive side; neg: its negative side (signed units: features.jsonl `neg`,
    # bottom-k exemplars), described and scored separately, as the reference does
    polarity: str = "pos"
    # output folder descriptions/<name>-<tag> (several describe runs side by side)
    tag: str | None = neutral(None)


    def check(self) -> DescribeConfig:
        """Values in range, names known; returns the section (tools.core.config.section)."""
        for key in ("explainer", "simulator"):
            if getattr(self, key) not in ("baseline", "llm"):
                raise UserError(f"config `describe.{key}`: expected baseline or llm, "
                                f"got {getattr(self, key)!r}")
        for key in ("explain_top", "score_top", "explain_per_bin", "score_per_bin", "explain_random",
                    "score_random", "min_explain", "min_score_firing", "min_score_random", "min_count",
                    "max_retries", "top_logprobs"):
            if getattr(self, key) < 0:
                raise UserError(f"config `describe.{key}`: must be >= 0, got {getattr(self, key)}")
        for key in ("max_items", "concurrency", "explain_max_tokens", "chunk_units", "candidates",
                    "simulate_max_tokens_per_token"):
            if getattr(self, key) < 1:
                raise UserError(f"config `describe.{key}`: must be >= 1, got {getattr(self, key)}")
        if self.candidate_exemplars is not None and self.candidate_exemplars < 1:
            raise UserError(f"config `describe.candidate_exemplars`: must be >= 1 or null, got "
                            f"{self.candidate_exemplars}")
        if not all(0 < q < 1 for q in self.detection_quantiles) or not 0 <= self.detection_negatives <= 1:
            raise UserError(f"config `describe.detection_quantiles`: probabilities in (0, 1), got "
                            f"{self.detection_quantiles}; `describe.detection_negatives` in [0, 1]")
        self.detection_quantiles = sorted(self.detection_quantiles)
        if self.max_units is not None and self.max_units < 1:
            raise UserError(f"config `describe.max_units`: must be >= 1 or null, got {self.max_units}")
        if not 0 < self.fire_frac <= 1:
            raise UserError(f"config `describe.fire_frac`: must be in (0, 1], got {self.fire_frac}")
        if self.timeout <= 0 or self.backoff < 0:
            raise UserError("config `describe.timeout` must be > 0 and `describe.backoff` >= 0")
        if self.top_logprobs > 20:
            raise UserError(f"config `describe.top_logprobs`: at most 20 (OpenAI's limit), "
                            f"got {self.top_logprobs}")
        if self.prompt_logprobs not in ("auto", False, "false"):
            raise UserError(f"config `describe.prompt_logprobs`: expected auto or false, "
                            f"got {self.prompt_logprobs!r}")
        self.prompt_logprobs = "auto" if self.prompt_logprobs == "auto" else False
        if self.polarity not in ("pos", "neg"):
            raise UserError(f"config `describe.polarity`: expected pos or neg, got {self.polarity!r}")
        if self.backend not in ("openai", "local"):
            raise UserError(f"config `describe.backend`: expected openai or local, got {self.backend!r}")
        if self.sample is not None and self.sample < 1:
            raise UserError(f"config `describe.sample`: must be >= 1 or null, got {self.sample}")
        if self.batch_tokens < 1 or self.score_uniform < 0 or (self.threads is not None and self.threads < 1):
            raise UserError("config `describe.batch_tokens` and `describe.threads` must be >= 1, "
                            "`describe.score_uniform` >= 0")
        if self.tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.tag):
            raise UserError(f"config `describe.tag`: letters, digits, `_.-` only, got {self.tag!r}")
        if uses_llm(self) and self.backend == "local":
            if not (self.model or self.embedded):
                raise UserError("config `describe.model` or `describe.embedded`: required with "
                                "describe.backend=local (e.g. describe.embedded=smollm2-135m-instruct or "
                                "describe.model=PATH)")
        elif uses_llm(self):
            if not self.model:
                raise UserError("config `describe.model`: required when describe.explainer or "
                                "describe.simulator is llm (e.g. describe.model=Qwen/Qwen2.5-7B-Instruct)")
            if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
                raise UserError(f"config `describe.base_url`: expected an http(s) URL, "
                                f"got {self.base_url!r}")
        return self


def uses_llm(dc: DescribeConfig) -> bool:
    """Whether the explainer or the simulator is an LLM."""
    return "llm" in (dc.explainer, dc.simulator)
