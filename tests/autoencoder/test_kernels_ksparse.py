"""The k-sparse kernel (TopK, BatchTopK) equals the dense formula: codes, x̂ and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autoencoder.kernels as K
from autoencoder.kernels import SparseCodes, ksparse_sae_forward
from autoencoder.saes.batchtopk import batch_topk

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def make(B: int, d: int, n: int, seed: int = 0, dtype=torch.float32, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    p = {"W_enc": torch.randn(d, n, generator=g, dtype=dtype) / d**0.5,
         "b_enc": shift + 0.1 * torch.randn(n, generator=g, dtype=dtype),
         "W_dec": torch.randn(n, d, generator=g, dtype=dtype) / d**0.5,
         "b_dec": 0.1 * torch.randn(d, generator=g, dtype=dtype)}
    return x, p


def dense(x, W_enc, b_enc, W_dec, b_dec, k, batch, center=True):
    pre = ((x - b_dec) if center else x) @ W_enc + b_enc
    if batch:
        f = batch_topk(pre, k)
    else:
        v, i = pre.topk(k, dim=1)
        f = torch.zeros_like(pre).scatter(1, i, F.relu(v))
    return f @ W_dec + b_dec, f


def fast(x, W_enc, b_enc, W_dec, b_dec, k, batch, center=True):
    x_hat, codes = ksparse_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, batch=batch, center=center)
    return x_hat, codes.dense()


def run(fn, x, p, k, batch, center=True, x_grad=False):
    leaves = {n: v.clone().requires_grad_() for n, v in p.items()}
    xx = x.clone().requires_grad_(x_grad)
    x_hat, f = fn(xx, *(leaves[n] for n in PARAMS), k, batch, center)
    ((x_hat - x).pow(2).sum(-1).mean() + 0.1 * x_hat.sum()).backward()
    grads = {n: v.grad for n, v in leaves.items()}
    if x_grad:
        grads["x"] = xx.grad
    return x_hat.detach(), f.detach(), grads


def check(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[2].keys() == b[2].keys()
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], rtol=rtol, atol=atol,
                                   msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("shape", [(64, 16, 96, 5), (37, 13, 51, 3), (300, 24, 700, 8), (1, 6, 10, 2)])
def test_matches_dense_formula(batch, shape):
    B, d, n, k = shape
    x, p = make(B, d, n, seed=B)
    check(run(fast, x, p, k, batch), run(dense, x, p, k, batch))


@pytest.mark.parametrize("batch", [False, True])
def test_input_gradient_transcoder_and_float64(batch):
    x, p = make(40, 10, 60, seed=1, dtype=torch.float64)
    for center in (True, False):
        check(run(fast, x, p, 4, batch, center, x_grad=True), run(dense, x, p, 4, batch, center, x_grad=True),
              rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", [False, True])
def test_kept_values_at_or_below_zero(batch):
    """Rows with fewer than k positive pre-activations: the kept non-positive ones are silent and get
    no gradient (ReLU'), exactly as in the dense formula."""
    x, p = make(32, 8, 40, seed=2, shift=-1.5)
    a = run(fast, x, p, 6, batch)
    check(a, run(dense, x, p, 6, batch))
    assert ((a[1] > 0).sum(1) < 6).any()


def test_batch_selection_exact_when_the_sample_misleads(monkeypatch):
    """A tiny threshold sample (noisy estimate) still yields exactly the k·B largest entries."""
    monkeypatch.setattr(K, "_THRESHOLD_SAMPLE", 7)
    x, p = make(128, 16, 200, seed=3, shift=3.0)  # every entry positive: the count is exact
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    for k in (1, 4, 20):
        rows, cols, vals, crow = K._batch_topk_pairs(pre, k)
        assert rows.numel() == k * 128
        want = batch_topk(pre, k)
        got = torch.zeros_like(pre)
        got[rows, cols] = vals
        torch.testing.assert_close(got, want)
        counts = torch.bincount(rows, minlength=128)
        assert torch.equal(crow, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
        assert (rows.diff() >= 0).all()  # row-major


def test_codes_statistics_match_dense():
    x, p = make(50, 12, 80, seed=4, shift=-1.0)
    with torch.no_grad():
        _, codes = ksparse_sae_forward(x, *(p[n] for n in PARAMS), 5)
    assert isinstance(codes, SparseCodes)
    f = codes.dense()
    torch.testing.assert_close(codes.l0(), (f > 0).sum(1).float().mean())
    assert torch.equal(codes.fired(), (f > 0).any(0))
    torch.testing.assert_close(codes.min_positive(), f[f > 0].min())


@pytest.mark.parametrize("batch", [False, True])
def test_bitwise_deterministic(batch):
    x, p = make(300, 24, 200, seed=5)
    a, b = run(fast, x, p, 6, batch), run(fast, x, p, 6, batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][n], b[2][n]) for n in PARAMS)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_train_step_on_the_kernel_matches_dense(arch):
    """The trainer's step with kernel=sparse: same loss, L0, fired latents, parameters and threshold."""
    from autoencoder.config import SAETrainConfig
    from autoencoder.saes import SAEModelConfig, arch_class, build_sae
    from autoencoder.step import make_optimizer, make_step

    cfg = SAETrainConfig(architecture=arch, n_features=96, k=4, lr=1e-2, compile=False)
    outs, saes = {}, {}
    for kernel in ("dense", "sparse"):
        torch.manual_seed(0)
        sae = build_sae(SAEModelConfig(arch_class(arch).registry_key(), 16, 96,
                                       **arch_class(arch).model_fields(cfg)), kernel=kernel)
        step = make_step(sae, make_optimizer(sae, cfg), cfg)
        g = torch.Generator().manual_seed(1)
        dead = torch.arange(96) < 10
        outs[kernel] = [step(torch.randn(64, 16, generator=g), dead_mask=dead) for _ in range(3)]
        saes[kernel] = sae
    for a, b in zip(outs["dense"], outs["sparse"], strict=True):
        for key in ("loss", "mse", "sparsity", "l0"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
        assert torch.equal(a["fired"], b["fired"])
    for n in saes["dense"].state_names():
        torch.testing.assert_close(getattr(saes["sparse"], n), getattr(saes["dense"], n), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bench_arch_prints_the_kernel_path(arch, capsys):
    bench = pytest.importorskip("tools.bench.sae_step")
    threads = torch.get_num_threads()
    try:
        bench.main(["--arch", arch, "--features", "256", "--batch", "64", "--d-in", "16", "--steps", "1",
                    "--warmup", "0", "--k", "4", "--threads", "1", "--no-shards"])
    finally:
        torch.set_num_threads(threads)
    lines = [dict(kv.split("=", 1) for kv in ln.split()) for ln in capsys.readouterr().out.splitlines()]
    ours = [ln for ln in lines if ln.get("kernel") == "auto"]
    assert ours and ours[0]["path"] == "sparse" and float(ours[0]["l0"]) <= 4
