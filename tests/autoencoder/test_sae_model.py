"""SAE modules: loss math by hand, decoder norm handling, geometric median, TopK/AuxK, files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from autoencoder.config import SAETrainConfig
from autoencoder.sae import load_sae, save_sae
from autoencoder.saes import L1SAE, SAEModelConfig, TopKSAE, build_sae, geometric_median
from autoencoder.step import make_optimizer, make_step
from tools.core.config import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def l1_sae(d_in=2, d_sae=2, kernel="dense") -> L1SAE:
    return L1SAE(SAEModelConfig("standard", d_in, d_sae), kernel=kernel)


def set_params(sae, **kw):
    with torch.no_grad():
        for k, v in kw.items():
            getattr(sae, k).copy_(torch.as_tensor(v, dtype=torch.float32))


def test_l1_loss_by_hand():
    sae = l1_sae()
    set_params(sae, W_enc=torch.eye(2), b_enc=[0.0, 0.0], W_dec=torch.eye(2), b_dec=[0.0, 0.0])
    x = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    t = sae.loss(x, l1_coeff=0.5)
    # row 1: f = [1, 0], x̂ = [1, 0], ‖x − x̂‖² = 4, ‖f‖₁ = 1; row 2: f = x, error 0, ‖f‖₁ = 4
    assert torch.equal(t.f, torch.tensor([[1.0, 0.0], [3.0, 1.0]]))
    assert t.mse.item() == pytest.approx(2.0)
    assert t.sparsity.item() == pytest.approx(2.5)
    assert t.overall.item() == pytest.approx(2.0 + 0.5 * 2.5)
    # averaged over d_in instead of summed
    assert sae.loss(x, l1_coeff=0.5, mse_reduction="mean").mse.item() == pytest.approx(1.0)
    # λ's meaning does not depend on the batch size: the same rows twice give the same loss
    assert sae.loss(torch.cat([x, x]), l1_coeff=0.5).overall.item() == pytest.approx(t.overall.item())


def test_l1_loss_with_b_dec_subtracted_before_encoding():
    sae = l1_sae()
    set_params(sae, W_enc=torch.eye(2), b_enc=[0.0, -1.0], W_dec=2 * torch.eye(2), b_dec=[1.0, 1.0])
    x = torch.tensor([[2.0, 4.0]])
    # x̄ = [1, 3]; pre = [1, 2]; f = [1, 2]; x̂ = [2, 4] + [1, 1] = [3, 5]; error = 1 + 1
    t = sae.loss(x, l1_coeff=0.1)
    assert torch.allclose(t.x_hat, torch.tensor([[3.0, 5.0]]))
    assert t.mse.item() == pytest.approx(2.0) and t.sparsity.item() == pytest.approx(3.0)


def test_decoder_unit_norm_and_parallel_gradient_removed():
    torch.manual_seed(0)
    sae = l1_sae(8, 16)
    cfg = SAETrainConfig(lr=1e-2, kernel="dense")
    step = make_step(sae, make_optimizer(sae, cfg), cfg)
    x = torch.randn(64, 8)
    for _ in range(3):
        before = sae.W_dec.detach().clone()
        step(x)
        g = sae.W_dec.grad
        # the gradient the optimiser used had no component along the (unit) rows it was taken at
        assert (g * before).sum(1).abs().max() < 1e-5
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)
        assert not torch.equal(before, sae.W_dec)


def test_remove_parallel_grad_keeps_the_orthogonal_part():
    sae = l1_sae(3, 2)
    set_params(sae, W_dec=[[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    sae.W_dec.grad = torch.tensor([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])
    sae.remove_parallel_grad()
    assert torch.allclose(sae.W_dec.grad[0], torch.tensor([0.0, 3.0, 4.0]))
    assert torch.allclose(sae.W_dec.grad[1], torch.tensor([1.0, 1.0 - 1.4 * 0.6, 1.0 - 1.4 * 0.8]))


def test_geometric_median_known_points():
    # on a line the geometric median is the ordinary median, not the mean (3.67)
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert torch.allclose(geometric_median(pts, max_iter=1000, tol=1e-10), torch.tensor([1.0, 0.0]),
                          atol=1e-3)
    # symmetric set: the centre
    sq = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]]) + 5
    assert torch.allclose(geometric_median(sq), torch.tensor([5.0, 5.0]), atol=1e-4)
    # random cloud with outliers: no perturbation lowers the sum of distances
    g = torch.Generator().manual_seed(0)
    cloud = torch.cat([torch.randn(200, 5, generator=g), 50 + torch.randn(20, 5, generator=g)])
    m = geometric_median(cloud, max_iter=500, tol=1e-12)
    cost = (cloud - m).norm(dim=1).sum()
    for _ in range(20):
        eps = 1e-2 * torch.randn(5, generator=g)
        assert (cloud - m - eps).norm(dim=1).sum() >= cost - 1e-4
    assert (m - cloud.mean(0)).norm() > 1.0  # the mean is dragged by the outliers; the median is not


def test_topk_keeps_k_and_auxk_only_trains_dead_latents():
    torch.manual_seed(0)
    sae = TopKSAE(SAEModelConfig("topk", 8, 32, k=3))
    x = torch.randn(16, 8)
    f = sae.encode(x)
    assert ((f > 0).sum(-1) <= 3).all() and ((f > 0).sum(-1) >= 1).all()
    pre = sae.pre_acts(x)
    top = pre.topk(3, dim=-1).indices
    assert torch.equal(f.gather(-1, top), torch.relu(pre.gather(-1, top)))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    t = sae.loss(x, dead_mask=dead, aux_k=2, aux_coeff=1.0)
    assert t.sparsity.item() > 0
    t.sparsity.backward()
    g = sae.W_enc.grad
    assert g[:, 5:].abs().max() == 0 and g[:, :5].abs().max() > 0
    assert sae.loss(x, dead_mask=torch.zeros(32, dtype=torch.bool), aux_k=2).sparsity.item() == 0


def test_k_larger_than_features_is_an_error():
    with pytest.raises(UserError, match="k"):
        build_sae(SAEModelConfig("topk", 8, 4, k=5))


@pytest.mark.parametrize("arch,k", [("standard", None), ("topk", 4)])
def test_save_load_saelens_keys_and_shapes(tmp_path, arch, k):
    torch.manual_seed(0)
    sae = build_sae(SAEModelConfig(arch, 12, 40, k=k))
    save_sae(sae, tmp_path, {"metrics": {"metrics/l0": 3.0}}, sparsity_log10=torch.full((40,), -2.0))
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {k_: tuple(v.shape) for k_, v in w.items()} == {
        "W_enc": (12, 40), "b_enc": (40,), "W_dec": (40, 12), "b_dec": (12,)}
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == 12 and cfg["d_sae"] == 40
    assert cfg["dtype"] == "float32" and cfg["hook_name"] == "blocks.0.mlp.hook_post"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metrics"]["metrics/l0"] == 3.0 and cfg["format"].startswith("monosemantic.sae/")
    if arch == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    assert load_file(str(tmp_path / "sparsity.safetensors"))["sparsity"].shape == (40,)
    back = load_sae(tmp_path)
    x = torch.randn(5, 12)
    assert type(back) is type(sae) and torch.equal(back(x), sae(x))
    assert torch.equal(back.encode(x), sae.encode(x))
    assert (back.encode(x) >= 0).all()


def test_load_rejects_mismatched_shapes_and_save_rejects_nan(tmp_path):
    sae = build_sae(SAEModelConfig("standard", 6, 10))
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 11
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="W_enc"):
        load_sae(tmp_path)
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        save_sae(sae, tmp_path / "nan")
    assert not (tmp_path / "nan" / "sae_weights.safetensors").exists()


def test_sparse_kernel_matches_dense_loss_and_grads():
    pytest.importorskip("autoencoder.kernels")
    torch.manual_seed(0)
    dense, fast = l1_sae(16, 64, "dense"), l1_sae(16, 64, "sparse")
    fast.load_state_dict(dense.state_dict())
    with torch.no_grad():
        dense.b_enc.fill_(-0.5)
        fast.b_enc.fill_(-0.5)
    x = torch.randn(128, 16)
    a, b = dense.loss(x, l1_coeff=0.1), fast.loss(x, l1_coeff=0.1)
    assert torch.allclose(a.overall, b.overall, rtol=1e-5)
    a.overall.backward()
    b.overall.backward()
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(dense, n).grad, getattr(fast, n).grad, rtol=1e-4, atol=1e-5), n
