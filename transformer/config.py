"""The `data` and `transformer` config sections: every default, its meaning, and its checks.

These dataclasses are the one source of the defaults (conf/schema.py registers them as the schema
of conf/data and conf/transformer; the YAML options there hold only what they change). Fields made
with `neutral(...)` do not enter the output hash (tools.core.config.output_fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from tools.core.config import UserError, neutral


@dataclass
class MixSource:
    name: str = "source"  # label in meta.json
    ratio: float = 1.0  # share of documents (ratios are normalised to sum to 1)
    path: str | None = None  # hub dataset id
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    files: str | None = None  # local glob(s), instead of `path`
    text_field: str = "text"
    chat_field: str | None = None  # null = `messages` or `conversation` if the rows have one
    sample_by: str = "document"  # .txt/.md: document | paragraph | line
    streaming: bool = True  # hub: stream only the rows needed (FineWeb-size sources)


def parse_sources(raw: Any) -> list[MixSource]:
    """Validate `data.sources` (MixSource records or mappings)."""
    if not raw:
        raise UserError("config `data.sources` is empty: data=mix needs at least one source")
    out = []
    for i, s in enumerate(raw):
        if isinstance(s, MixSource):
            src = s
        else:
            unknown = set(s) - set(MixSource.__dataclass_fields__)
            if unknown:
                raise UserError(f"config `data.sources[{i}]` has unknown keys {sorted(unknown)} "
                                f"(expected {sorted(MixSource.__dataclass_fields__)})")
            src = MixSource(**dict(s))
        if bool(src.path) == bool(src.files):
            raise UserError(f"config `data.sources[{i}]` ({src.name}): give exactly one of `path` (hub) "
                            "or `files` (local)")
        if not src.ratio > 0:
            raise UserError(f"config `data.sources[{i}].ratio`={src.ratio}: expected > 0")
        out.append(src)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise UserError(f"config `data.sources`: names must differ, got {names}")
    return out


@dataclass
class DataConfig:
    """The `data` section, owned by transformer.prepare: the corpus and how it is split and tokenized.

    The default is the embedded Shakespeare (conf/data/shakespeare.yaml holds its held-out plays).
    """

    name: str = "shakespeare"  # output folder: data_dir/<name>/
    source: str = "shakespeare"  # shakespeare (embedded) | hub | local | mix
    # hub: a Hugging Face dataset id, config name, split and revision
    path: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    val_split: str | None = None  # a hub split to use as val instead of holding documents out
    # local: a glob (or comma-separated globs) of .txt/.md, .jsonl/.json or .parquet files
    files: str | None = None
    text_field: str = "text"  # the column holding the text (.jsonl / .parquet / hub)
    sample_by: str = "document"  # .txt/.md: one document per file | paragraph | line
    # held-out documents: files whose name matches one of these globs, else a seeded random fraction
    val_files: list[str] = field(default_factory=list)
    val_fraction: float = 0.0005
    test_fraction: float = 0.0  # > 0: also hold out this fraction of documents as test.bin
    # mix: corpora mixed by document ratio (transformer.mix.MixSource fields)
    sources: list[MixSource] = field(default_factory=list)
    split_seed: int = 2357  # nanoGPT's openwebtext split seed
    max_documents: int | None = None  # cap (e.g. a quick look at a big corpus)
    tokenizer: str = "gpt2"  # subject=gpt: the tiktoken encoding; an hf subject uses its own tokenizer
    num_proc: int | None = neutral(None)  # null = every core
    batch_size: int = neutral(1000)  # documents per tokenizer call and per write
    cache_dir: str | None = neutral(None)  # Hugging Face datasets cache; null = its default

    def check(self) -> DataConfig:
        d = self
        if d.source not in ("shakespeare", "hub", "local", "mix"):
            raise UserError(f"config `data.source`={d.source!r}: expected shakespeare, hub, local or mix")
        if d.source == "mix":
            parse_sources(d.sources)
        if d.source == "hub" and not d.path:
            raise UserError("config `data.path` is required with data.source=hub (a Hugging Face dataset id)")
        if d.source == "local" and not d.files:
            raise UserError("config `data.files` is required with data=local (a glob, e.g. 'corpus/*.txt')")
        if d.sample_by not in ("document", "paragraph", "line"):
            raise UserError(f"config `data.sample_by`={d.sample_by!r}: expected document, paragraph or line")
        if not 0.0 <= d.val_fraction < 1.0:
            raise UserError(f"config `data.val_fraction`={d.val_fraction}: expected a fraction in [0, 1)")
        if not 0.0 <= d.test_fraction < 1.0 - d.val_fraction:
            raise UserError(f"config `data.test_fraction`={d.test_fraction}: expected a fraction in [0, 1) "
                            "that leaves documents to train on after val")
        if d.num_proc is not None and d.num_proc < 1:
            raise UserError(f"config `data.num_proc`={d.num_proc}: expected null or >= 1")
        if d.batch_size < 1:
            raise UserError(f"config `data.batch_size`={d.batch_size}: expected >= 1")
        if d.max_documents is not None and d.max_documents < 2:
            raise UserError(f"config `data.max_documents`={d.max_documents}: expected null or >= 2")
        if not d.name or "/" in d.name or d.name.startswith("."):
            raise UserError(f"config `data.name`={d.name!r}: expected a plain folder name")
        return d


@dataclass
class TrainConfig:
    """The `transformer` section, owned by transformer.train: the subject GPT (nanoGPT-style; the
    defaults are the one-layer model) and how it is trained."""

    # model: the GPTConfig fields
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    activation: str = "gelu"
    dropout: float = 0.0
    bias: bool = False
    # batch: a step sees batch_size x grad_accum x world_size sequences of block_size tokens
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per step per process (derived when tokens_per_step is set)
    tokens_per_step: int | None = None  # global tokens per optimizer step, split over processes
    max_steps: int = 5000
    # optimizer and schedule
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 200
    decay_steps: int | None = None  # cosine reaches min_lr here; null = max_steps
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    # execution
    dtype: str = "auto"  # auto (CUDA: bf16, else fp16; CPU: fp32) | float32 | bfloat16 | float16
    compile: bool = neutral(False)
    fused_loss: bool = neutral(True)  # chunked unembedding + cross-entropy, no [tokens, vocab] logits kept
    loss_chunk: int = neutral(1024)  # rows per chunk of the fused loss
    threads: int | None = neutral(None)  # CPU threads per process; null = torch's default
    # evaluation, logging, checkpoints
    eval_interval: int = neutral(250)
    eval_batches: int = 20  # fixed val batches (of batch_size sequences) per evaluation
    log_interval: int = neutral(10)
    checkpoint_interval: int = neutral(500)
    resume: bool = neutral(True)  # continue from run_dir/transformer/checkpoint when it exists
    halt_at_step: int | None = neutral(None)  # stop after this step as if killed (a rerun continues)
    peak_flops: float | None = neutral(None)  # per device, for MFU; null = GPU table / measured CPU matmul

    def check(self) -> TrainConfig:
        c = self
        positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval",
                    "checkpoint_interval", "loss_chunk")
        for k in positive:
            if getattr(c, k) < 1:
                raise UserError(f"config `transformer.{k}`={getattr(c, k)}: expected >= 1")
        for k in ("warmup_steps",):
            if getattr(c, k) < 0:
                raise UserError(f"config `transformer.{k}`={getattr(c, k)}: expected >= 0")
        if not (c.lr > 0 and 0 <= c.min_lr <= c.lr):
            raise UserError(f"config `transformer.lr`={c.lr}, `min_lr`={c.min_lr}: "
                            "expected 0 <= min_lr <= lr, lr > 0")
        if c.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"config `transformer.dtype`={c.dtype!r}: "
                            "expected auto, float32, bfloat16 or float16")
        if c.tokens_per_step is not None and c.tokens_per_step < 1:
            raise UserError(f"config `transformer.tokens_per_step`={c.tokens_per_step}: "
                            "expected null or >= 1")
        if c.threads is not None and c.threads < 1:
            raise UserError(f"config `transformer.threads`={c.threads}: expected null or >= 1")
        self.model_config()  # shape checks name their key
        return c

    def model_config(self) -> Any:
        """The GPTConfig fields of this section, checked."""
        from transformer.model import GPTConfig

        keys = [f.name for f in fields(GPTConfig)]
        return GPTConfig(**{k: getattr(self, k) for k in keys}).check()
