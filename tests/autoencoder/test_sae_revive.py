"""Resampling that revives: fresh per-feature Adam, new features that fire near their seed, no
collateral deaths on planted data; the initial reconstruction's scale; the scale-free loss; AuxK."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autoencoder import train
from autoencoder.config import SAETrainConfig
from autoencoder.init import init_from_sample
from autoencoder.optim import FeatureAdam
from autoencoder.resample import ResampleRecipe, resample_dead
from autoencoder.saes import L1SAE, SAEModelConfig, TopKSAE
from autoencoder.shard_write import write_shards
from autoencoder.step import make_optimizer, make_step
from autoencoder.synthetic import ground_truth, sparse_rows
from tools.core.config import UserError, compose

pytestmark = pytest.mark.usefixtures("one_thread")


def offset_rows(n: int, d: int = 16, n_true: int = 48, seed: int = 0) -> torch.Tensor:
    """Sparse planted features on top of a large shared mean, like MLP activations."""
    g = torch.Generator().manual_seed(seed)
    feats = ground_truth(n_true, d, g)
    offset = 2.0 * ground_truth(1, d, torch.Generator().manual_seed(99))[0]
    return sparse_rows(feats, n, 0.04, g, offset=offset)


def named(sae):
    return [(n, getattr(sae, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec")]


def test_reset_features_step_like_a_fresh_adam():
    torch.manual_seed(0)
    sae = L1SAE(SAEModelConfig("standard", 6, 10))
    opt = FeatureAdam(named(sae), lr=1e-2)
    x = torch.randn(64, 6)
    for _ in range(30):  # old moments and a large step count everywhere
        opt.zero_grad()
        sae.loss(x, l1_coeff=0.1).overall.backward()
        opt.step()
    idx = torch.tensor([2, 7])
    opt.reset_features(idx)
    # a new Adam on the reset entries, and one continuing the untouched ones, fed the same gradients
    fresh = {n: torch.nn.Parameter(p.detach()[:, idx].clone() if n == "W_enc" else p.detach()[idx].clone())
             for n, p in named(sae) if n != "b_dec"}
    fresh_opt = torch.optim.Adam(list(fresh.values()), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        sae.loss(x, l1_coeff=0.1).overall.backward()
        for n, q in fresh.items():
            g = getattr(sae, n).grad
            q.grad = (g[:, idx] if n == "W_enc" else g[idx]).clone()
        opt.step()
        fresh_opt.step()
        for n, q in fresh.items():
            p = getattr(sae, n).detach()
            got = p[:, idx] if n == "W_enc" else p[idx]
            assert torch.allclose(got, q.detach(), atol=1e-6, rtol=1e-5), n
    # the first update of a reset entry is ~lr (sign-like), not ~3 lr as with zeroed moments alone
    opt2 = FeatureAdam(named(sae), lr=1e-2)
    before = sae.b_enc.detach().clone()
    opt2.zero_grad()
    sae.loss(x, l1_coeff=0.1).overall.backward()
    opt2.step()
    assert (sae.b_enc.detach() - before).abs().max() <= 1e-2 * 1.0001


def test_lr_scale_multiplies_one_parameters_steps():
    """`sae.decoder_lr_scale`: W_dec steps as Adam at m·lr, the other parameters as Adam at lr."""
    torch.manual_seed(0)
    sae = L1SAE(SAEModelConfig("standard", 6, 10))
    copies = {n: torch.nn.Parameter(p.detach().clone()) for n, p in named(sae)}
    opt = FeatureAdam(named(sae), lr=1e-2, lr_scale={"W_dec": 3.0})
    ref = torch.optim.Adam([{"params": [q], "lr": 3e-2 if n == "W_dec" else 1e-2} for n, q in copies.items()])
    x = torch.randn(64, 6)
    for _ in range(5):
        opt.zero_grad()
        sae.loss(x, l1_coeff=0.1).overall.backward()
        for n, q in copies.items():
            q.grad = getattr(sae, n).grad.clone()
            q.data.copy_(getattr(sae, n).detach())
        opt.step()
        ref.step()
        for n, q in copies.items():
            assert torch.allclose(getattr(sae, n).detach(), q.detach(), atol=1e-6, rtol=1e-5), n
    c = SAETrainConfig(architecture="topk", decoder_lr_scale=3.0, n_features=10)
    assert make_optimizer(sae, c).lr_scale[id(sae.W_dec)] == 3.0
    with pytest.raises(UserError, match="decoder_lr_scale"):
        SAETrainConfig(decoder_lr_scale=0.0).check()


def test_zeroed_moments_alone_overshoot_after_many_steps():
    """Cause 1 of the collapse: with a tensor-wide step count, a zeroed entry moves ~3.2 lr."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FeatureAdam([("b_enc", p)], lr=1.0)
    for _ in range(1000):
        p.grad = torch.ones(4)
        opt.step()
    t = 1001  # zeroed moments under step count t: m̂ = 0.1 g / (1 − 0.9^t), v̂ = 0.001 g² / (1 − 0.999^t)
    for steps, want in ((False, 0.1 / (1 - 0.9**t) / (0.001 / (1 - 0.999**t)) ** 0.5), (True, 1.0)):
        opt.reset_features(torch.tensor([0]), steps=steps)
        before = p.detach().clone()
        p.grad = torch.ones(4)
        opt.step()
        assert float(before[0] - p.detach()[0]) == pytest.approx(want, rel=1e-3)
        assert want == 1.0 or want > 2.5  # ~3.2 once 0.999^t is small too


def trained_on_offset_rows(steps: int = 300):
    x = offset_rows(4096)
    torch.manual_seed(0)
    sae = L1SAE(SAEModelConfig("standard", 16, 64))
    c = SAETrainConfig(lr=3e-3, l1_coeff=0.2, kernel="dense", n_features=64)
    init_from_sample(sae, x.double(), c, log=lambda *a: None)
    opt = make_optimizer(sae, c)
    step = make_step(sae, opt, c)
    step.set_scale(float((x - sae.b_dec.detach()).pow(2).sum(-1).mean().sqrt()))
    for i in range(steps):
        step(x[(i * 128) % 4096:(i * 128) % 4096 + 128])
    return sae, opt, x


def test_planted_dead_feature_is_revived_and_fires_on_few_rows():
    sae, opt, x = trained_on_offset_rows()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[5] = True
    rates = {}
    for name, recipe in (("default", ResampleRecipe()), ("paper", ResampleRecipe.paper())):
        with torch.no_grad():
            sae.b_enc[5] = -1e3  # planted dead
        assert (sae.encode(x)[:, 5] > 0).sum() == 0
        resample_dead(sae, opt, dead, x[:2048], generator=torch.Generator().manual_seed(0), recipe=recipe)
        rates[name] = float((sae.encode(x)[:, 5] > 0).float().mean())
    # alive again on a few rows (its 1% target, or more where the seed's own features are common)
    assert 0 < rates["default"] <= 0.1, rates
    assert rates["paper"] > 0.3, rates  # raw direction and bias 0: fires on a large part of the data


def test_alive_features_never_drop_across_resampling(tmp_path, monkeypatch):
    import autoencoder.init

    real_init = autoencoder.init.init_from_sample

    def init_with_dead(sae, sample, c, log=print):  # features 0..31 planted dead from the start
        out = real_init(sae, sample, c, log)
        with torch.no_grad():
            sae.b_enc[:32] = -1e3
        return out

    monkeypatch.setattr(autoencoder.init, "init_from_sample", init_with_dead)
    x = offset_rows(24000).numpy().astype(np.float16)
    write_shards(tmp_path / "activations/train", x[:20000], 5000, resample_rows=4096)
    write_shards(tmp_path / "activations/val", x[20000:], 4000, split="val", resample_rows=0)
    cfg = compose([f"run_dir={tmp_path}", "wandb.mode=disabled", "device=cpu", "data_dir=/nonexistent",
                   "sae.n_features=128", "sae.batch_size=128", "sae.lr=3e-3", "sae.lr_warmup_steps=20",
                   "sae.kernel=dense", "sae.l1_coeff=0.3", "sae.steps=500", "sae.log_every=100",
                   "sae.resample_steps=[300]", "sae.dead_tokens=12800", "sae.resample_watch_steps=150",
                   "sae.eval_every=1000", "sae.name=w"])
    s = train.run(cfg)
    ev = json.loads((tmp_path / "sae/w/cfg.json").read_text())["training"]["resampled"]
    assert len(ev) == 1
    e = ev[0]
    assert e["count"] >= 32, e  # the planted dead features (and any others) are resampled
    assert e["revived"] >= 0.8 * e["count"], e
    assert e["survived"] >= e["alive_before"] - 1, e  # no collateral deaths
    assert e["survived"] + e["revived"] >= e["alive_before"]
    assert len(e["curve"]["mse"]) == 50 + 150 and e["curve"]["step"][0] == 251
    assert s["dead_fraction"] < 0.25


def test_initial_reconstruction_has_the_inputs_scale():
    x = offset_rows(4096, d=32).double()
    c = SAETrainConfig(n_features=1024)
    ratios = {}
    for rescale in (True, False):
        torch.manual_seed(0)
        sae = L1SAE(SAEModelConfig("standard", 32, 1024))
        c.init_rescale = rescale
        info = init_from_sample(sae, x[:2048], c, log=lambda *a: None)
        held = x[2048:].float()
        rec = (sae(held) - sae.b_dec).detach().pow(2).sum(-1).mean().sqrt()
        ratios[rescale] = float(rec / (held - sae.b_dec.detach()).pow(2).sum(-1).mean().sqrt())
        assert info["input_scale"] == pytest.approx(float((x[:2048] - sae.b_dec.double()).pow(2)
                                                          .sum(-1).mean().sqrt()), rel=1e-5)
    assert 1 / 1.5 < ratios[True] < 1.5
    assert ratios[False] > 4  # unit rows with W_enc = W_decᵀ: ~d_sae / (2 d_in) = 16x here


def test_normalised_loss_does_not_depend_on_the_activations_scale():
    torch.manual_seed(0)
    x = offset_rows(256)
    a = L1SAE(SAEModelConfig("standard", 16, 32))
    b = L1SAE(SAEModelConfig("standard", 16, 32))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # the same SAE for 10x the input: biases scale, directions do not
        a.b_enc.fill_(-0.1)
        b.b_enc.fill_(-1.0)
        b.b_dec.copy_(10 * a.b_dec)
    la = a.loss(x, l1_coeff=0.2, mse_scale=4.0, l1_scale=2.0)
    lb = b.loss(10 * x, l1_coeff=0.2, mse_scale=400.0, l1_scale=20.0)
    assert lb.overall.item() == pytest.approx(la.overall.item(), rel=1e-5)


def test_auxk_is_normalised_by_the_batch_variance_of_the_residual():
    torch.manual_seed(0)
    sae = TopKSAE(SAEModelConfig("topk", 8, 32, k=2))
    x = torch.randn(16, 8) + 3.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:6] = True
    t = sae.loss(x, dead_mask=dead, aux_k=4, aux_coeff=1.0)
    e = (x - t.x_hat).detach()
    pre = sae.pre_acts(x)
    z = sae.topk_pre(torch.where(dead, pre, torch.full_like(pre, -float("inf"))), 4)
    want = (z @ sae.W_dec - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert t.sparsity.item() == pytest.approx(float(want), rel=1e-5)


def test_dead_threshold_is_in_tokens():
    from autoencoder.trainer import dead_steps

    assert dead_steps(SAETrainConfig(dead_tokens=10_000_000, batch_size=4096)) == 2442
    assert dead_steps(SAETrainConfig(dead_tokens=128_000, batch_size=512)) == 250
    c = SAETrainConfig(dead_tokens=128_000, aux_dead_tokens=16_384, batch_size=512)
    assert (dead_steps(c), dead_steps(c, aux=True)) == (250, 32)  # resampling keeps its window
    assert dead_steps(SAETrainConfig(dead_tokens=128_000, batch_size=512), aux=True) == 250
