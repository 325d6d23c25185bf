"""The Subject interface on our GPT and on tiny random Llama / GPT-2 / GPT-NeoX models (no download)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.subjects import D, M, N, V, hf_subject, tiny_hf
from tools.core.config import UserError
from transformer.model import GPT, GPTConfig
from transformer.subject import GPTSubject, hook_point


def mlp_parts(model, arch: str, layer: int):
    """The MLP module of `layer` and the manual neuron computation from its input."""
    if arch == "llama":
        mlp = model.model.layers[layer].mlp
        return mlp, lambda x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    if arch == "gpt2":
        mlp = model.transformer.h[layer].mlp
        return mlp, lambda x: mlp.act(mlp.c_fc(x))
    mlp = model.gpt_neox.layers[layer].mlp
    return mlp, lambda x: mlp.act(mlp.dense_h_to_4h(x))


ARCHS = ["llama", "gpt2", "gpt_neox"]
IDX = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_neurons_equal_a_manual_computation(arch):
    model = tiny_hf(arch)
    s = hf_subject(model)
    assert (s.n_layers, s.d_model, s.d_mlp) == (N, D, M)
    mlp, neurons = mlp_parts(model, arch, 1)
    seen = {}
    h = mlp.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    try:
        with torch.no_grad():
            full = model(IDX, output_hidden_states=True)
    finally:
        h.remove()
    got = s.capture(IDX, ["blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"])
    with torch.no_grad():
        want = neurons(seen["x"])
    assert got["blocks.1.mlp.hook_post"].shape == (2, 9, M)
    torch.testing.assert_close(got["blocks.1.mlp.hook_post"], want, rtol=1e-6, atol=1e-6)
    assert (want < 0).any()  # signed (Llama's gated product; GELU's negative lobe)
    assert torch.equal(got["blocks.1.hook_mlp_out"], seen["out"])
    assert torch.equal(got["blocks.1.hook_resid_post"], full.hidden_states[2])
    # the direct path of neurons: mlp_out = neurons @ W_out^T (+ bias)
    W = s.neuron_out_weight(1)
    assert W.shape == (D, M)
    bias = s._site("blocks.1.mlp.hook_post")[0].bias
    lin = got["blocks.1.mlp.hook_post"] @ W.t() + (0 if bias is None else bias)
    torch.testing.assert_close(lin, got["blocks.1.hook_mlp_out"], rtol=1e-5, atol=1e-5)
    assert s.unembedding().shape == (V, D)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_edit_reproduces_logits_and_ablation_changes_them(arch):
    s = hf_subject(tiny_hf(arch))
    base = s.logits(IDX)
    for hook in ["blocks.0.mlp.hook_post", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"]:
        own = s.capture(IDX, [hook])[hook]
        assert torch.equal(s.logits(IDX, {hook: lambda v, own=own: own.clone()}), base)
        zero = s.logits(IDX, {hook: torch.zeros_like})
        assert not torch.allclose(zero, base)
    tgt = torch.roll(IDX, -1, 1)
    assert float(s.loss(IDX, tgt, {"blocks.0.mlp.hook_post": lambda v: v})) == float(s.loss(IDX, tgt))


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_layer_capture_equals_single_captures_and_stops_early(arch):
    model = tiny_hf(arch)
    s = hf_subject(model)
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
    many = s.capture(IDX, hooks)
    assert sorted(many) == sorted(hooks)
    for h in hooks:
        assert torch.equal(many[h], s.capture(IDX, [h])[h])
    calls = []
    handles = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(s.blocks)]
    handles.append(model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("head")))
    try:
        s.capture(IDX, ["blocks.0.mlp.hook_post"])
        assert calls == []  # stopped inside layer 0, before its block finished
        s.capture(IDX, hooks)
        assert calls == [0, 1]  # layer 2 and the unembedding never ran
        s.logits(IDX)  # the capture's hooks were removed: a plain forward runs everything
        assert calls == [0, 1, 0, 1, 2, "head"]
    finally:
        for h in handles:
            h.remove()


def test_bad_hooks_and_unknown_architectures_are_named():
    model = tiny_hf("llama")
    s = hf_subject(model)
    with pytest.raises(UserError, match=r"blocks.5.mlp.hook_post.*layers 0..2.*blocks.<L>.hook_resid_post"):
        s.capture(IDX, ["blocks.5.mlp.hook_post"])
    with pytest.raises(UserError, match="not blocks.<layer>"):
        s.capture(IDX, ["blocks.0.attn.hook_z"])
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match=r"architecture 'mystery' has no known MLP-neuron hook.*"
                                        r"subject.neuron_module=model.layers.\{layer\}.mlp.down_proj"):
        hf_subject(model)
    s = hf_subject(model, neuron_module="model.layers.{layer}.mlp.down_proj")
    assert s.capture(IDX, ["blocks.0.mlp.hook_post"])["blocks.0.mlp.hook_post"].shape == (2, 9, M)
    with pytest.raises(UserError, match=r"no module 'c_proj' in mlp \(it has: gate_proj, up_proj, down_proj"):
        hf_subject(model, neuron_module="model.layers.{layer}.mlp.c_proj")


def test_gpt_subject_is_the_models_own_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=D)).eval()
    s = GPTSubject(model)
    idx = IDX[:, :8]
    got = s.capture(idx, [hook_point("neurons", 1), hook_point("neurons", 0), hook_point("resid_post", 0)])
    assert torch.equal(got["blocks.1.mlp.hook_post"], model.mlp_acts(idx, 1))
    assert torch.equal(got["blocks.0.mlp.hook_post"], model.mlp_acts(idx, 0))
    with torch.no_grad():
        logits, _ = model(idx)
        zeroed, _ = model(idx, mlp_edit=lambda i, h: torch.zeros_like(h) if i == 1 else h)
    assert torch.equal(s.logits(idx), logits)
    assert torch.equal(s.logits(idx, {"blocks.1.mlp.hook_post": torch.zeros_like}), zeroed)
    own = got["blocks.0.hook_resid_post"]
    assert torch.equal(s.logits(idx, {"blocks.0.hook_resid_post": lambda v: own}), logits)
    assert s.width("blocks.0.mlp.hook_post") == 4 * D and s.width("blocks.1.hook_resid_post") == D
    assert s.neuron_out_weight(1).shape == (D, 4 * D) and s.unembedding().shape == (V, D)
    with pytest.raises(UserError, match="layers 0..1"):
        s.capture(idx, ["blocks.2.hook_mlp_out"])
