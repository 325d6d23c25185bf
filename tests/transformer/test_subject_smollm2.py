"""The embedded SmolLM2-135M-Instruct as a Subject (slow: converts the GGUF once per session)."""

from __future__ import annotations

import pytest
import torch

from autoencoder.metrics import loss_recovered
from tools.core.config import compose
from transformer.hf_load import load_hf_tokenizer
from transformer.subject_load import load_subject, subject_config, subject_spec


@pytest.mark.slow
def test_smollm2_neurons_and_identity_splice(smollm2_data_dir):
    cfg = compose(["subject=smollm2", f"data_dir={smollm2_data_dir}"])
    tok = load_hf_tokenizer(subject_config(cfg), smollm2_data_dir)
    assert tok("Hello world").input_ids == [19556, 905]
    spec = subject_spec(cfg)
    assert (spec.n_layers, spec.vocab_size, spec.identity["architecture"]) == (30, 49152, "llama")
    assert spec.identity["name"] == "smollm2-135m-instruct" and len(spec.identity["weights"]) == 1
    s = load_subject(cfg, "cpu")
    assert (s.n_layers, s.d_model, s.d_mlp) == (30, 576, 1536)
    ids = tok("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt").input_ids
    mlp = s.model.model.layers[10].mlp
    seen = {}
    h = mlp.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    try:
        got = s.capture(ids, ["blocks.10.mlp.hook_post"])["blocks.10.mlp.hook_post"]
    finally:
        h.remove()
    with torch.no_grad():
        want = mlp.act_fn(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"])
    assert got.shape == (1, ids.shape[1], 1536)
    torch.testing.assert_close(got, want)
    assert (got > 0).any() and (got < 0).any()  # signed: both polarities
    ctx = torch.cat([ids, ids], 0)
    out = loss_recovered(s, torch.nn.Identity(), ctx, "blocks.10.mlp.hook_post", batch_size=2)
    assert out["metrics/loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    g = "model_performance_preservation/"
    assert out[g + "ce_loss_without_sae"] < out[g + "ce_loss_with_ablation"]  # a trained layer matters
