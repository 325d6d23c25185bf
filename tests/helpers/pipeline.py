"""A toy pipeline (a tiny local corpus and overrides that run every stage in seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAME = "tiny"


WORDS = ("the cat sat on a mat while dogs ran far away and birds sang songs of old kings who ruled "
         "green hills with stone towers near the sea").split()


TINY = [
    "data=local", "data.num_proc=1", "data.val_fraction=0.1", "device=cpu", "wandb.mode=disabled",
    "transformer.n_embd=32", "transformer.n_head=2", "transformer.block_size=32", "transformer.batch_size=4",
    "transformer.max_steps=6", "transformer.eval_interval=3", "transformer.eval_batches=1",
    "transformer.checkpoint_interval=2", "transformer.log_interval=2", "transformer.warmup_steps=1",
    "transformer.threads=1",
    "activations.contexts=48", "activations.tokens_per_context=8", "activations.rows_per_shard=128",
    "activations.resample_rows=96", "activations.batch_contexts=16",
    f"sae.name={NAME}", "sae.n_features=64", "sae.batch_size=32", "sae.steps=24", "sae.lr_warmup_steps=2",
    "sae.checkpoint_every=8", "sae.eval_every=12", "sae.resample_steps=[12]", "sae.dead_tokens=192",
    "sae.b_dec_init_rows=64", "sae.eval_rows=64", "sae.eval_contexts=4", "sae.log_every=6",
    "sae.kernel=dense",
    f"features.sae={NAME}", "features.contexts=24", "features.window=4", "features.top_k=4",
    "features.per_bin=1", "features.n_random=3", "features.negative_candidates=16", "features.logit_k=3",
    "describe.chunk_units=4", "describe.max_units=24", "describe.site=false",
]


def write_corpus(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(60):
        words = rng.choice(WORDS, size=int(rng.integers(30, 80)))
        (folder / f"doc{i:03d}.txt").write_text(" ".join(words) + ".\n", encoding="utf-8")


def hf_pipeline(tmp_path: Path, run: str = "run") -> list[str]:
    """Overrides of a whole pipeline on a tiny random Llama (saved to a folder with a real tokenizer,
    built once per `tmp_path`) and a few Shakespeare excerpts: two layers' activations, an SAE on layer
    1's neurons, the neurons of layers 0 and 2, the baseline describer; `run_dir` is tmp_path/`run`."""
    from tests.helpers import ROOT
    from tests.helpers.subjects import tiny_llama_folder

    model, corpus = tmp_path / "tiny-llama", tmp_path / "corpus"
    if not corpus.is_dir():
        tiny_llama_folder(model)
        corpus.mkdir()
        for p in sorted((ROOT / "transformer" / "assets" / "shakespeare").glob("*.md"))[:6]:
            (corpus / f"{p.stem}.txt").write_text(p.read_text(encoding="utf-8")[:12000], encoding="utf-8")
    return [
        f"run_dir={tmp_path / run}", f"data_dir={tmp_path / 'data'}", "device=cpu", "wandb.mode=disabled",
        "subject=hf", f"subject.model={model}", "data=local", f"data.files={corpus}/*.txt",
        "data.val_fraction=0.34", "data.num_proc=1",
        "activations.contexts=64", "activations.val_contexts=16", "activations.tokens_per_context=8",
        "activations.block_size=32", "activations.layers=[1,2]", "activations.rows_per_shard=256",
        "activations.resample_rows=128", "activations.batch_contexts=16",
        "sae.hook=blocks.1.mlp.hook_post", "sae.n_features=96", "sae.batch_size=64", "sae.steps=40",
        "sae.resample_steps=[20]", "sae.dead_tokens=640", "sae.eval_every=20", "sae.checkpoint_every=20",
        "sae.eval_contexts=4", "sae.eval_context_len=32", "sae.eval_rows=128", "sae.b_dec_init_rows=256",
        "sae.log_every=10", "sae.lr_warmup_steps=5", "sae.kernel=dense",
        "features.contexts=24", "features.context_len=32", "features.window=4", "features.top_k=4",
        "features.per_bin=1", "features.n_random=3", "features.n_uniform=3",
        "features.negative_candidates=16", "features.logit_k=3",
        "pipeline.neuron_layers=[0,2]", "pipeline.llm_sample=0",
    ]
