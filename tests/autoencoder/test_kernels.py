"""The L1 SAE kernel equals the dense autograd formula: outputs and every gradient, in every mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoencoder.kernels import _L1SAE, SPARSE_MAX_DENSITY, l1_sae_forward, sparse_benefit

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def make(B: int, d: int, n: int, density: float, seed: int = 0, dtype=torch.float32):
    """Random SAE weights with b_enc calibrated per feature so about `density` of f is nonzero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    p = {"W_enc": torch.randn(d, n, generator=g, dtype=dtype) / d**0.5,
         "W_dec": torch.randn(n, d, generator=g, dtype=dtype) / d**0.5,
         "b_dec": 0.1 * torch.randn(d, generator=g, dtype=dtype)}
    pre = (x - p["b_dec"]) @ p["W_enc"]
    q = torch.quantile(pre.double(), 1 - density, dim=0).to(dtype) if B > 1 else pre[0] - 0.1
    p["b_enc"] = -q + 0.01 * torch.randn(n, generator=g, dtype=dtype)
    return x, p


def run(fn, x, p, l1: float = 1e-2, use_f: bool = True, x_grad: bool = False):
    """Loss = MSE + λ L1 (as the trainer computes it); returns outputs and all gradients."""
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    xx = x.clone().requires_grad_(x_grad)
    x_hat, f = fn(xx, *(leaves[k] for k in PARAMS))
    loss = (x_hat - x).pow(2).sum(-1).mean()
    if use_f:
        loss = loss + l1 * f.abs().sum(-1).mean()
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items()}
    if x_grad:
        grads["x"] = xx.grad
    return x_hat.detach(), f.detach(), grads


def reference(x, W_enc, b_enc, W_dec, b_dec):
    f = F.relu((x - b_dec) @ W_enc + b_enc)
    return f @ W_dec + b_dec, f


def check_equal(a, b, rtol=1e-4, atol=1e-5):
    (xa, fa, ga), (xb, fb, gb) = a, b
    torch.testing.assert_close(fa, fb, rtol=rtol, atol=atol)
    torch.testing.assert_close(xa, xb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert ga[k] is not None, k
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"grad {k}: {m}")


def mode_fn(mode):
    return lambda *a: l1_sae_forward(*a, mode=mode)


@pytest.mark.parametrize("mode", ["sparse", "fused", "auto"])
@pytest.mark.parametrize("density", [0.01, 0.5])
@pytest.mark.parametrize("shape", [(64, 32, 96), (37, 13, 51)])  # (batch, d_in, d_sae), odd ones
def test_matches_dense_autograd(mode, density, shape):
    x, p = make(*shape, density=density)
    f_density = (reference(x, *(p[k] for k in PARAMS))[1] > 0).float().mean().item()
    assert abs(f_density - density) < 0.1 * max(density, 0.05) + 0.02  # the calibration worked
    check_equal(run(mode_fn(mode), x, p), run(reference, x, p))


@pytest.mark.parametrize("mode", ["sparse", "fused"])
def test_dead_feature_column_and_batch_of_one(mode):
    x, p = make(16, 8, 24, density=0.2, seed=1)
    p["b_enc"][5] = -1e4  # feature 5 never fires: its gradients must be exactly zero
    out = run(mode_fn(mode), x, p)
    check_equal(out, run(reference, x, p))
    assert (out[1][:, 5] == 0).all()
    assert (out[2]["W_enc"][:, 5] == 0).all() and out[2]["b_enc"][5] == 0 and (out[2]["W_dec"][5] == 0).all()
    x1, p1 = make(1, 8, 24, density=0.2, seed=2)
    check_equal(run(mode_fn(mode), x1, p1), run(reference, x1, p1))


@pytest.mark.parametrize("mode", ["sparse", "fused"])
def test_nothing_fires(mode):
    x, p = make(8, 6, 10, density=0.2, seed=3)
    p["b_enc"] = torch.full((10,), -1e4)
    out = run(mode_fn(mode), x, p)
    check_equal(out, run(reference, x, p))
    assert out[1].count_nonzero() == 0


@pytest.mark.parametrize("mode", ["sparse", "fused"])
def test_f_unused_and_input_gradient(mode):
    """No L1 term (∂L/∂f is None inside the kernel) and a differentiable x."""
    x, p = make(24, 10, 40, density=0.1, seed=4)
    check_equal(run(mode_fn(mode), x, p, use_f=False), run(reference, x, p, use_f=False))
    check_equal(run(mode_fn(mode), x, p, x_grad=True), run(reference, x, p, x_grad=True))


@pytest.mark.parametrize("loss", [lambda x, x_hat, f: (x_hat - x).pow(2).sum() + 0.3 * f.sum(),
                                  lambda x, x_hat, f: x_hat.sum() + 0.3 * f.sum()])
def test_broadcast_incoming_gradients(loss):
    """Plain sums hand the kernel stride-0 ∂L/∂f and ∂L/∂x̂; gathers and GEMMs must read them right."""
    x, p = make(20, 8, 30, density=0.1, seed=5)

    def loss_grads(fn):
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        x_hat, f = fn(x, *(leaves[k] for k in PARAMS))
        loss(x, x_hat, f).backward()
        return {k: v.grad for k, v in leaves.items()}

    want = loss_grads(reference)
    for mode in ("sparse", "fused"):
        got = loss_grads(mode_fn(mode))
        for k in PARAMS:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "fused"])
def test_float64(mode):
    x, p = make(20, 7, 33, density=0.15, seed=6, dtype=torch.float64)
    check_equal(run(mode_fn(mode), x, p), run(reference, x, p), rtol=1e-10, atol=1e-12)


def test_auto_picks_path_by_density(monkeypatch):
    seen = []
    orig = _L1SAE.forward

    def spy(ctx, *a):
        out = orig(ctx, *a)
        seen.append(ctx.mode)
        return out

    monkeypatch.setattr(_L1SAE, "forward", staticmethod(spy))
    for density in (0.005, 0.5):
        x, p = make(128, 16, 400, density=density, seed=7)
        with torch.no_grad():
            l1_sae_forward(x, *(p[k] for k in PARAMS))
    assert seen == ["sparse", "fused"]


def test_sparse_benefit_rule():
    assert sparse_benefit(32, 4096) and sparse_benefit(32, 16384)
    assert not sparse_benefit(2048, 4096)
    assert not sparse_benefit(SPARSE_MAX_DENSITY * 1000, 1000)
    assert not sparse_benefit(1, 4096, device="cuda")


def test_bad_arguments():
    x, p = make(4, 3, 5, density=0.5)
    with pytest.raises(ValueError, match="mode"):
        l1_sae_forward(x, *(p[k] for k in PARAMS), mode="fast")
    with pytest.raises(ValueError, match="batch, d_in"):
        l1_sae_forward(x[None], *(p[k] for k in PARAMS))


def test_under_torch_compile():
    """Dynamo runs the kernel eagerly (graph break) instead of failing on its data-dependent shapes."""
    x, p = make(32, 8, 40, density=0.05, seed=8)
    fn = torch.compile(lambda *a: l1_sae_forward(*a, mode="auto"), backend="eager")
    check_equal(run(fn, x, p), run(reference, x, p))


def test_trainer_sae_uses_kernel():
    """L1SAE(kernel="sparse") gives the dense module's loss and gradients (the trainer's path)."""
    sae_mod = pytest.importorskip("autoencoder.saes")
    cfg = sae_mod.SAEModelConfig(architecture="standard", d_in=12, d_sae=48)
    x, p = make(40, 12, 48, density=0.05, seed=9)
    grads = {}
    for kernel in ("dense", "sparse"):
        sae = sae_mod.L1SAE(cfg, kernel=kernel)
        with torch.no_grad():
            for k in PARAMS:
                getattr(sae, k).copy_(p[k])
        t = sae.loss(x, l1_coeff=3e-2)
        t.overall.backward()
        grads[kernel] = (t.overall.detach(), {k: getattr(sae, k).grad for k in PARAMS})
    torch.testing.assert_close(grads["sparse"][0], grads["dense"][0])
    for k in PARAMS:
        torch.testing.assert_close(grads["sparse"][1][k], grads["dense"][1][k], rtol=1e-4, atol=1e-5)


def test_bench_runs_and_prints_key_value_lines(capsys):
    """tools/bench/sae_step on a tiny config: every line parses as key=value, all variants present."""
    bench = pytest.importorskip("tools.bench.sae_step")
    threads = torch.get_num_threads()
    try:
        bench.main(["--features", "96", "--batch", "64", "--d-in", "16", "--steps", "1", "--warmup", "0",
                    "--l0", "4", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = [dict(kv.split("=", 1) for kv in line.split()) for line in capsys.readouterr().out.splitlines()]
    steps = [ln for ln in lines if "rows_per_s" in ln and ln.get("source") == "memory" and "sparsity" in ln
             and "l0" in ln]
    assert {(ln["sparsity"], ln["kernel"]) for ln in steps} == {
        ("dense", "reference"), ("dense", "auto"), ("trained", "reference"), ("trained", "auto")}
    trained = [ln for ln in steps if ln["sparsity"] == "trained"]
    assert all(float(ln["l0"]) < 20 for ln in trained)  # the calibration made it sparse (target 4 of 96)
    assert any(ln.get("path") == "sparse" for ln in trained)
    assert sum(1 for ln in lines if ln.get("kind") == "ceiling") == 2
    assert any(ln.get("source") == "shards" and float(ln["rows_per_s"]) > 0 for ln in lines)


@pytest.mark.parametrize("mode", ["sparse", "fused"])
def test_bitwise_deterministic(mode):
    """Exact resume relies on the same step giving the same bits: no order-dependent atomics."""
    x, p = make(300, 24, 200, density=0.05, seed=10)
    a, b = run(mode_fn(mode), x, p), run(mode_fn(mode), x, p)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][k], b[2][k]) for k in PARAMS)
