"""Neuron resampling (Anthropic 2023) on planted data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoencoder.optim import FeatureAdam
from autoencoder.resample import ResampleRecipe, load_resample_set, resample_dead
from autoencoder.saes import L1SAE, SAEModelConfig
from tools.core.config import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_sae_and_adam(d_in=4, d_sae=6):
    torch.manual_seed(0)
    sae = L1SAE(SAEModelConfig("standard", d_in, d_sae))
    opt = FeatureAdam(list(sae.named_parameters()), lr=1e-2)
    for _ in range(3):  # non-zero Adam moments everywhere
        opt.zero_grad()
        sae.loss(torch.randn(32, d_in), l1_coeff=0.1).overall.backward()
        opt.step()
    with torch.no_grad():
        sae.b_dec.zero_()  # so that a zero input is reconstructed exactly (loss 0: never drawn)
        sae.b_enc.clamp_(max=0.0)
    return sae, opt


def test_paper_recipe_rows_are_normalised_high_loss_inputs_and_adam_moments_reset():
    sae, opt = trained_sae_and_adam()
    a = torch.tensor([3.0, 0.0, 4.0, 0.0])
    b = torch.tensor([0.0, -2.0, 0.0, 2.0])
    inputs = torch.stack([torch.zeros(4), a, torch.zeros(4), b, torch.zeros(4)])
    dead = torch.tensor([False, True, False, False, True, False])
    alive_norm = sae.W_enc.norm(dim=0)[~dead].mean()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
               for n, p in sae.named_parameters()}

    steps = {n: opt.state[p]["step"].clone() for n, p in sae.named_parameters()}
    idx = resample_dead(sae, opt, dead, inputs, generator=torch.Generator().manual_seed(1),
                        recipe=ResampleRecipe.paper())
    assert idx.tolist() == [1, 4]
    units = {tuple((a / a.norm()).tolist()), tuple((b / b.norm()).tolist())}
    got = {tuple(r) for r in sae.W_dec[dead].detach().tolist()}
    assert {tuple(round(v, 5) for v in r) for r in got} == {tuple(round(v, 5) for v in r) for r in units}
    for j in (1, 4):  # encoder = same unit input × 0.2 × mean alive encoder norm; bias 0
        assert torch.allclose(sae.W_enc[:, j], sae.W_dec[j] * 0.2 * alive_norm, atol=1e-6)
        assert sae.b_enc[j].item() == 0.0
    # other features untouched
    for name in ("W_dec", "b_enc"):
        assert torch.equal(getattr(sae, name)[~dead], before[name][~dead])
    assert torch.equal(sae.W_enc[:, ~dead], before["W_enc"][:, ~dead])
    assert torch.equal(sae.b_dec, before["b_dec"])
    # Adam moments: zero for exactly the resampled entries, the rest untouched
    where = {"W_enc": lambda t, m: t[:, m], "b_enc": lambda t, m: t[m], "W_dec": lambda t, m: t[m]}
    for name, p in sae.named_parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            now, old = opt.state[p][k], moments[name][k]
            if name == "b_dec":
                assert torch.equal(now, old)
                continue
            sel = where[name]
            assert (sel(now, dead) == 0).all(), (name, k)
            assert torch.equal(sel(now, ~dead), sel(old, ~dead)), (name, k)
            assert (sel(old, dead) != 0).any()
        assert torch.equal(opt.state[p]["step"], steps[name])  # the paper's recipe keeps the counts


def test_sampling_is_proportional_to_squared_loss():
    sae = L1SAE(SAEModelConfig("standard", 4, 3))
    with torch.no_grad():  # f = 0 everywhere: the loss of a row is ‖x‖²
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
    inputs = torch.tensor([[1.0, 0, 0, 0], [0, 2.0**0.5, 0, 0]])  # losses 1 and 2: weights 1 : 4
    dead = torch.tensor([True, False, False])
    hits, trials = 0, 2000
    w_dec = sae.W_dec.detach().clone()
    for s in range(trials):
        with torch.no_grad():
            sae.W_dec.copy_(w_dec)
        resample_dead(sae, None, dead, inputs, generator=torch.Generator().manual_seed(s),
                      recipe=ResampleRecipe.paper())
        hits += int(sae.W_dec[0, 1].item() > 0.5)
    assert abs(hits / trials - 0.8) < 0.04


def test_no_dead_features_changes_nothing():
    sae, opt = trained_sae_and_adam()
    before = sae.W_dec.detach().clone()
    idx = resample_dead(sae, opt, torch.zeros(6, dtype=torch.bool), torch.randn(5, 4),
                        generator=torch.Generator().manual_seed(0))
    assert idx.numel() == 0 and torch.equal(before, sae.W_dec)


def test_empty_or_mismatched_resample_set_is_an_error(tmp_path):
    np.save(tmp_path / "resample.npy", np.zeros((0, 4), dtype=np.float16))
    with pytest.raises(UserError, match="empty"):
        load_resample_set(tmp_path / "resample.npy", 4)
    np.save(tmp_path / "resample.npy", np.zeros((3, 5), dtype=np.float16))
    with pytest.raises(UserError, match=r"\[n, 4\]"):
        load_resample_set(tmp_path / "resample.npy", 4)
    with pytest.raises(UserError, match="not found"):
        load_resample_set(tmp_path / "missing.npy", 4)
    sae, opt = trained_sae_and_adam()
    with pytest.raises(UserError, match="empty"):
        resample_dead(sae, opt, torch.ones(6, dtype=torch.bool), torch.zeros(0, 4),
                      generator=torch.Generator())


def test_centered_resampling_uses_x_minus_b_dec():
    sae, opt = trained_sae_and_adam()
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    a = torch.tensor([4.0, 1.0, 4.0, 0.0])  # x − b_dec = [3, 0, 4, 0]
    dead = torch.tensor([False, False, True, False, False, False])
    resample_dead(sae, opt, dead, torch.stack([a, a]), generator=torch.Generator().manual_seed(0),
                  recipe=ResampleRecipe(centered=True, density=None))
    assert torch.allclose(sae.W_dec[2], torch.tensor([0.6, 0.0, 0.8, 0.0]))
