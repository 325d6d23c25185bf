"""Every hook point (resid_pre, resid_mid, ln2.hook_normalized, neurons, mlp_out, resid_post) against a
manual computation from the model's own modules, on our GPT and tiny random HF models of every listed
architecture; several hooks in one capture; edits and transcoder splices on the new hook points."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.subjects import HF_ARCHS, D, M, N, V, hf_subject, tiny_hf
from tools.core.config import UserError
from transformer.model import GPT, GPTConfig
from transformer.subject import HOOK_KINDS, GPTSubject, Splice, hook_point, transcoder_splice

IDX = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
GEMMA2 = ("gemma2", "gemma3_text", "gemma3")


def parts(model, arch: str, layer: int) -> dict:
    """The modules of `layer`: attention, the norm the MLP reads, the MLP, and Gemma-2's extra norms."""
    if arch == "gpt2":
        b = model.transformer.h[layer]
        return {"block": b, "attn": b.attn, "ln2": b.ln_2, "mlp": b.mlp}
    if arch.startswith("gpt_neox"):
        b = model.gpt_neox.layers[layer]
        return {"block": b, "attn": b.attention, "ln2": b.post_attention_layernorm, "mlp": b.mlp}
    b = (model.model.language_model if arch == "gemma3" else model.model).layers[layer]
    p = {"block": b, "attn": b.self_attn, "mlp": b.mlp}
    if arch in GEMMA2:
        return {**p, "ln2": b.pre_feedforward_layernorm, "post_attn": b.post_attention_layernorm,
                "post_mlp": b.post_feedforward_layernorm}
    return {**p, "ln2": b.post_attention_layernorm}


def mlp_fn(p: dict):
    """The MLP's contribution to the residual, from its input (what an exact transcoder computes)."""
    return (lambda x: p["post_mlp"](p["mlp"](x))) if "post_mlp" in p else p["mlp"]


def manual(model, arch: str, layer: int) -> dict[str, torch.Tensor]:
    """Each hook point of `layer` recomputed from the modules, given the layer's input and its
    attention output (read with a plain forward hook on the attention module)."""
    p = parts(model, arch, layer)
    seen = {}
    h = p["attn"].register_forward_hook(lambda mod, args, out: seen.update(attn=out[0]))
    try:
        with torch.no_grad():
            hidden = model(IDX, output_hidden_states=True).hidden_states
    finally:
        h.remove()
    with torch.no_grad():
        pre = hidden[layer]
        attn = p["post_attn"](seen["attn"]) if "post_attn" in p else seen["attn"]
        parallel = arch == "gpt_neox"
        mid = pre + attn
        mlp_in = p["ln2"](pre if parallel else mid)
        mlp_out = mlp_fn(p)(mlp_in)
        post = (pre + attn + mlp_out) if parallel else mid + mlp_out
    out = {"resid_pre": pre, "mlp_in": mlp_in, "mlp_out": mlp_out, "resid_post": post,
           "next": hidden[layer + 1]}
    return out if parallel else {**out, "resid_mid": mid}


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_hooks_equal_a_manual_computation(arch):
    model = tiny_hf(arch)
    s = hf_subject(model)
    want = manual(model, arch, 1)
    torch.testing.assert_close(want["resid_post"], want["next"], rtol=1e-5, atol=1e-5)  # the recipe is right
    kinds = [k for k in HOOK_KINDS if k in want]
    got = s.capture(IDX, [hook_point(k, 1) for k in [*kinds, "neurons"]])
    for k in kinds:
        assert got[hook_point(k, 1)].shape == (2, 9, D), k
        torch.testing.assert_close(got[hook_point(k, 1)], want[k], rtol=1e-5, atol=1e-5, msg=k)
        assert s.width(hook_point(k, 1)) == D
    assert s.width(hook_point("neurons", 1)) == M
    # the neurons feed the output projection: mlp_out before Gemma's post-MLP norm
    W, bias = s.neuron_out_weight(1), s._site(hook_point("neurons", 1))[0].bias
    lin = got[hook_point("neurons", 1)] @ W.t() + (0 if bias is None else bias)
    with torch.no_grad():
        torch.testing.assert_close(lin, parts(model, arch, 1)["mlp"](got[hook_point("mlp_in", 1)]),
                                   rtol=1e-5, atol=1e-5)
    if arch == "gpt_neox":
        with pytest.raises(UserError, match=r"blocks.1.hook_resid_mid.*no resid_mid.*use_parallel_residual"
                                            r".*blocks.<L>.hook_resid_pre"):
            s.capture(IDX, ["blocks.1.hook_resid_mid"])


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_several_hooks_in_one_capture_equal_single_captures_and_stop_early(arch):
    model = tiny_hf(arch)
    s = hf_subject(model)
    hooks = [h for h in s.hook_names() if int(h.split(".")[1]) < 2]
    assert len(hooks) == 2 * (len(HOOK_KINDS) - len(s.unavailable))
    many = s.capture(IDX, hooks[::-1])
    assert list(many) == hooks  # in forward order
    for h in hooks:
        assert torch.equal(many[h], s.capture(IDX, [h])[h]), h
    assert torch.equal(many["blocks.0.hook_resid_post"], many["blocks.1.hook_resid_pre"])
    calls = []
    handles = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(s.blocks)]
    try:
        s.capture(IDX, ["blocks.1.hook_resid_pre", "blocks.0.ln2.hook_normalized"])
        assert calls == [0]  # layer 1 never ran
        calls.clear()
        s.capture(IDX, ["blocks.1.ln2.hook_normalized"])
        assert calls == [0]  # stopped inside layer 1
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_edits_and_transcoder_splice(arch):
    model = tiny_hf(arch)
    s = hf_subject(model)
    base = s.logits(IDX)
    own = s.capture(IDX, s.hook_names())
    for kind in ("resid_pre", "resid_mid", "mlp_in", "mlp_out", "resid_post"):
        if kind in s.unavailable:
            continue
        h = hook_point(kind, 1)
        assert torch.equal(s.logits(IDX, {h: lambda v, h=h: own[h].clone()}), base), kind
        assert not torch.allclose(s.logits(IDX, {h: torch.zeros_like}), base), kind
    p = parts(model, arch, 1)
    # a transcoder that is the MLP itself reproduces the logits exactly; a zero one changes them
    assert torch.equal(s.logits(IDX, transcoder_splice(1, mlp_fn(p))), base)
    zero = s.logits(IDX, transcoder_splice(1, torch.zeros_like))
    assert torch.equal(zero, s.logits(IDX, {"blocks.1.hook_mlp_out": torch.zeros_like}))
    assert not torch.allclose(zero, base)
    if "resid_mid" not in s.unavailable:
        # an edit of resid_mid flows into the residual: the same as writing its consequence at resid_post
        e = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(2))
        mid = own["blocks.1.hook_resid_mid"] + e
        with torch.no_grad():
            post = mid + mlp_fn(p)(p["ln2"](mid))
        via_mid = s.logits(IDX, {"blocks.1.hook_resid_mid": lambda v: v + e})
        torch.testing.assert_close(via_mid, s.logits(IDX, {"blocks.1.hook_resid_post": lambda v: post}),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(via_mid, base)


def test_bad_edits_and_hooks_are_named():
    s = hf_subject(tiny_hf("llama"))
    with pytest.raises(UserError, match=r"splice into blocks.0.hook_mlp_out reads blocks.1.ln2"):
        s.logits(IDX, {"blocks.0.hook_mlp_out": Splice("blocks.1.ln2.hook_normalized", lambda x: x)})
    with pytest.raises(UserError, match=r"edit of blocks.0.hook_resid_mid: returned \(2, 9, 3\)"):
        s.logits(IDX, {"blocks.0.hook_resid_mid": lambda v: v[..., :3]})
    with pytest.raises(UserError, match=r"'blocks.0.ln2.hook_scale' is not blocks.<layer>.*ln2.hook_norm"):
        s.capture(IDX, ["blocks.0.ln2.hook_scale"])
    with pytest.raises(UserError, match=r"blocks.3.hook_resid_pre.*layers 0..2.*blocks.<L>.hook_resid_mid"):
        s.capture(IDX, ["blocks.3.hook_resid_pre"])
    model = tiny_hf("llama")
    model.config.model_type = "mystery"
    s = hf_subject(model, neuron_module="model.layers.{layer}.mlp.down_proj")
    assert s.capture(IDX, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"].shape == (2, 9, D)
    with pytest.raises(UserError, match=r"blocks.0.ln2.hook_normalized.*no mlp_in hook point.*known only"):
        s.capture(IDX, ["blocks.0.ln2.hook_normalized"])


def test_gemma_unembedding_folds_one_plus_the_norm_scale():
    model = tiny_hf("gemma2")
    s = hf_subject(model)
    x = torch.randn(3, D)
    with torch.no_grad():
        want = model.lm_head(model.model.norm(x))
        rms = x / x.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).sqrt()
    torch.testing.assert_close(rms @ s.unembedding().t(), want, rtol=1e-4, atol=1e-4)


def gpt_manual(model: GPT, idx: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        x = model._embed(idx)
        for block in model.transformer.h[:layer]:
            x = block(x)
        b = model.transformer.h[layer]
        mid = x + b.attn(b.ln_1(x))
        n = b.ln_2(mid)
        h = b.mlp.act(b.mlp.c_fc(n))
        out = b.mlp.c_proj(h)
    return {"resid_pre": x, "resid_mid": mid, "mlp_in": n, "neurons": h, "mlp_out": out,
            "resid_post": mid + out}


def test_gpt_hooks_edits_and_splice():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=N, n_head=2, n_embd=D)).eval()
    s = GPTSubject(model)
    idx = IDX[:, :8]
    hooks = s.hook_names()
    assert len(hooks) == N * len(HOOK_KINDS)
    many = s.capture(idx, hooks)
    for layer in range(N):
        for kind, want in gpt_manual(model, idx, layer).items():
            assert torch.equal(many[hook_point(kind, layer)], want), (kind, layer)
    for h in hooks:
        assert torch.equal(s.capture(idx, [h])[h], many[h])
    with torch.no_grad():
        base = model(idx)[0]
    assert torch.equal(s.logits(idx), base)
    for kind in ("resid_pre", "resid_mid", "mlp_in", "mlp_out", "resid_post"):
        h = hook_point(kind, 1)
        assert torch.equal(s.logits(idx, {h: lambda v, h=h: many[h].clone()}), base)
        assert not torch.allclose(s.logits(idx, {h: torch.zeros_like}), base)
    mlp = model.transformer.h[1].mlp
    assert torch.equal(s.logits(idx, transcoder_splice(1, lambda x: mlp.out(mlp.hidden(x)))), base)
    assert not torch.allclose(s.logits(idx, transcoder_splice(1, torch.zeros_like)), base)
    # edits compose in forward order: resid_mid edited, then a transcoder reads the edited stream's norm
    e = torch.randn(2, 8, D)
    edits = {"blocks.1.hook_resid_mid": lambda v: v + e, **transcoder_splice(1, lambda x: 2 * x)}
    with torch.no_grad():
        mid = many["blocks.1.hook_resid_mid"] + e
        post = mid + 2 * model.transformer.h[1].ln_2(mid)
    want = s.logits(idx, {"blocks.1.hook_resid_post": lambda v: post})
    torch.testing.assert_close(s.logits(idx, edits), want)
    assert s.width("blocks.0.ln2.hook_normalized") == D and s.width("blocks.0.hook_resid_mid") == D
