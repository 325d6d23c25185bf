"""A transcoder on our GPT end to end: paired MLP input/output shards from one generation run, trained
with sae.kind=transcoder, and its loss recovered by splicing its output in place of the MLP's."""

from __future__ import annotations

import json
import math

import pytest

from autoencoder import generate, train
from tests.helpers.pipeline import TINY, write_corpus
from tools.core.config import compose
from transformer import prepare
from transformer import train as lm_train

HOOK_IN, HOOK_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcoder")
    write_corpus(root / "corpus")
    base = [f"run_dir={root / 'run'}", f"data_dir={root / 'data'}", f"data.files={root}/corpus/*.txt", *TINY,
            # an MLP that matters: a few hundred steps (at 40 the MLP's output is nearly constant)
            "transformer.max_steps=300", "transformer.lr=3e-3", "transformer.eval_interval=300",
            "transformer.checkpoint_interval=300", "activations.contexts=160", "activations.val_contexts=40",
            "activations.tokens_per_context=16", "activations.rows_per_shard=1024",
            "activations.hook=[mlp_in,mlp_out]"]
    prepare.run(compose(base))
    lm_train.run(compose(base))
    for split in ("train", "val"):
        generate.run(compose([*base, f"activations.split={split}"]))
    return root, base


def test_transcoder_learns_the_mlp_and_its_splice_recovers_the_loss(paired):
    root, base = paired
    out = train.run(compose([*base, "sae=topk", "sae.name=tc", "sae.kind=transcoder",
                             f"sae.hook_in={HOOK_IN}", f"sae.hook_out={HOOK_OUT}", "sae.k=8",
                             "sae.n_features=128", "sae.steps=400", "sae.batch_size=128", "sae.lr=1e-3",
                             "sae.resample_steps=[]", "sae.eval_every=400", "sae.checkpoint_every=400",
                             "sae.eval_rows=640", "sae.eval_contexts=8"]))
    cfg = json.loads((root / "run" / "sae" / "tc" / "cfg.json").read_text())
    assert cfg["hook_name"] == HOOK_IN and cfg["hook_name_out"] == HOOK_OUT
    m = cfg["metrics"]
    assert out["explained_variance"] > 0.8, out
    assert math.isfinite(m["metrics/loss_recovered"]), m
    g = "model_performance_preservation/"
    assert m[g + "ce_loss_with_sae"] < m[g + "ce_loss_with_ablation"], m
    assert m["metrics/loss_recovered"] > 0.8, m

