"""The GPT: shapes, the MLP read/replace hooks, the chunked loss, and save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tools.core.config import UserError
from transformer.lm_loss import linear_cross_entropy
from transformer.model import GPT, GPTConfig, load_model, save_model

CFG = GPTConfig(block_size=16, vocab_size=320, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture()
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def batch(B=3, T=16, V=320, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


def test_shapes_defaults_and_tied_embeddings(model):
    x, y = batch()
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, 320) and loss.ndim == 0
    assert model.mlp_acts(x, 1).shape == (3, 16, 128)
    assert model.lm_head.weight is model.transformer.wte.weight
    d = GPTConfig()
    assert (d.n_layer, d.n_embd, d.n_head, d.d_mlp, d.block_size, d.vocab_size, d.bias) == \
        (1, 128, 4, 512, 1024, 50304, False)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_capture_then_replace_reproduces_logits(model):
    x, _ = batch()
    base, _ = model(x)
    captured = {}

    def capture(layer, h):
        captured[layer] = h.clone()
        return h

    same, _ = model(x, mlp_edit=capture)
    assert torch.equal(same, base)
    for layer in range(CFG.n_layer):
        assert torch.equal(model.mlp_acts(x, layer), captured[layer])
    replayed, _ = model(x, mlp_edit=lambda layer, h: captured[layer])
    assert torch.equal(replayed, base)
    ablated, _ = model(x, mlp_edit=lambda layer, h: torch.zeros_like(h) if layer == 0 else h)
    assert (ablated - base).abs().max() > 1e-3


def test_mlp_acts_computes_nothing_after_the_hook(model):
    called = []
    for name, mod in model.named_modules():
        if name.endswith("h.0.mlp.c_proj") or name in ("lm_head", "transformer.ln_f") or name.startswith(
                "transformer.h.1"):
            mod.register_forward_hook(lambda m, i, o, name=name: called.append(name))
    h = model.mlp_acts(batch()[0], 0)
    assert called == [] and h.shape[-1] == CFG.d_mlp
    with pytest.raises(UserError, match="layer 2 out of range"):
        model.mlp_acts(batch()[0], 2)


def test_relu_activation_is_nonnegative():
    m = GPT(GPTConfig(block_size=8, vocab_size=64, n_embd=16, n_head=2, activation="relu"))
    assert (m.mlp_acts(torch.randint(64, (2, 8))) >= 0).all()
    with pytest.raises(UserError, match="activation"):
        GPTConfig(activation="swish").check()


def test_fused_loss_matches_full_cross_entropy_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(101, 24, requires_grad=True)
    t = torch.randint(101, (37,))
    t[[3, 10]] = -1
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-1)
    gx, gw = torch.autograd.grad(ref * 2.5, (x, w))
    ours = linear_cross_entropy(x, w, t, chunk=8)  # chunks that do not divide the rows
    ox, ow = torch.autograd.grad(ours * 2.5, (x, w))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ox, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ow, gw, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no gradient work when none is needed
        assert linear_cross_entropy(x, w, t).item() == pytest.approx(ref.item(), rel=1e-6)


def test_model_fused_path_equals_logits_path(model):
    x, y = batch()
    model.train()
    _, full = model(x, y)
    g_full = torch.autograd.grad(full, list(model.parameters()))
    _, fused = model(x, y, return_logits=False, loss_chunk=5)
    g_fused = torch.autograd.grad(fused, list(model.parameters()))
    assert fused.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(g_full, g_fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_none, bf = model(x, y, return_logits=False)
    assert logits_none is None and bf.dtype == torch.float32
    assert bf.item() == pytest.approx(full.item(), rel=2e-2)


def test_save_load_round_trip_and_mismatch(model, tmp_path):
    save_model(model, tmp_path / "m", extra={"val_loss": 1.5})
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model"]["n_layer"] == 2 and meta["val_loss"] == 1.5
    back = load_model(tmp_path / "m")
    x, _ = batch()
    assert torch.equal(back(x)[0], model(x)[0])
    assert back.lm_head.weight is back.transformer.wte.weight
    meta["model"]["n_embd"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"model.safetensors does not match config.json .*size mismatch"):
        load_model(tmp_path / "m")
