"""Each architecture against its formula on a tiny dictionary: encode/decode, JumpReLU's
straight-through gradients, BatchTopK's batch selection and inference threshold, Matryoshka's
summed prefix losses, the k-sparse kernel, and bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoencoder.config import SAETrainConfig
from autoencoder.saes import SAEModelConfig, build_sae
from autoencoder.saes.jumprelu import JumpReLUFn, StepFn
from autoencoder.step import make_optimizer, make_step
from tools.core.config import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
D, N = 6, 10


def tiny(arch: str, **kw):
    torch.manual_seed(0)
    sae = build_sae(SAEModelConfig(arch, D, N, **kw))
    with torch.no_grad():
        for n in sae.param_names():
            getattr(sae, n).normal_()
        if "threshold" in sae.param_names():
            sae.threshold.abs_()
    return sae


def test_standard_and_topk_formulas():
    x = torch.randn(5, D)
    sae = tiny("standard")
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), pre.clamp_min(0))
    sae = tiny("topk", k=3)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    kth = pre.sort(dim=1, descending=True).values[:, 2:3]
    want = torch.where(pre >= kth, pre.clamp_min(0), torch.zeros(()))
    torch.testing.assert_close(sae.encode(x), want)
    torch.testing.assert_close(sae(x), want @ sae.W_dec + sae.b_dec)


def test_jumprelu_formula_and_transcoder_skip():
    sae = tiny("jumprelu")
    with torch.no_grad():
        sae.threshold.uniform_(0, 1)
    x = torch.randn(5, D)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    want = torch.where(pre > sae.threshold, pre, torch.zeros(()))
    torch.testing.assert_close(sae.encode(x), want)
    tc = tiny("jumprelu", kind="transcoder", d_out=4, skip=True)
    pre = x @ tc.W_enc + tc.b_enc  # a transcoder does not subtract b_dec
    f = torch.where(pre > tc.threshold, pre, torch.zeros(()))
    torch.testing.assert_close(tc(x), f @ tc.W_dec + tc.b_dec + x @ tc.W_skip.t())


def test_jumprelu_straight_through_gradients_match_the_smoothed_step():
    """The STE gradient w.r.t. θ is the derivative of the step smoothed by the rectangle kernel:
    H_ε(z) = clamp(z/ε + 1/2, 0, 1); checked by finite differences of that function."""
    eps = 0.1
    pre = torch.linspace(-0.3, 0.6, 901, dtype=torch.float64)[:, None].repeat(1, 3)
    theta = torch.tensor([0.0512, 0.2037, 0.3121], dtype=torch.float64, requires_grad=True)  # off the grid

    def smooth_step(t):
        return ((pre - t) / eps + 0.5).clamp(0, 1)

    h = 1e-6
    fd_step = torch.stack([(smooth_step(theta.detach() + h * e) - smooth_step(theta.detach() - h * e))
                           .sum() / (2 * h) for e in torch.eye(3, dtype=torch.float64)])
    StepFn.apply(pre, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, fd_step)
    theta.grad = None
    # f = pre · H(pre − θ): ∂f/∂θ ≈ pre · ∂H_ε/∂θ = −(θ/ε) K at pre ≈ θ (the paper's estimator)
    t0 = theta.detach()
    fd_jump = torch.stack([(pre * smooth_step(t0 + h * e) - pre * smooth_step(t0 - h * e)).sum(0) / (2 * h)
                           for e in torch.eye(3, dtype=torch.float64)]).diagonal()
    JumpReLUFn.apply(pre, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, fd_jump, rtol=0.35, atol=0)
    assert torch.allclose(theta.grad, -(theta.detach() / eps) * (((pre - theta.detach()).abs() < eps / 2)
                                                                .double().sum(0)))


def test_batchtopk_keeps_exactly_k_times_batch():
    sae = tiny("batchtopk", k=3)
    x = torch.randn(40, D)
    with torch.no_grad():
        sae.b_enc.add_(5.0)  # every pre-activation positive: the count is exact
        t = sae.loss(x)
    assert int((t.f > 0).sum()) == 3 * 40
    l0 = (t.f > 0).sum(1)
    assert l0.min() < l0.max()  # rows get different L0 at a fixed total
    pre = sae.pre_acts(x)
    kept = pre[t.f > 0]
    assert kept.min() >= pre[t.f == 0].max()


def test_batchtopk_threshold_reproduces_the_training_l0():
    torch.manual_seed(1)
    d, n, k = 16, 64, 4
    sae = build_sae(SAEModelConfig("batchtopk", d, n, k=k))
    cfg = SAETrainConfig(architecture="batchtopk", n_features=n, k=k, lr=3e-3, kernel="dense")
    step = make_step(sae, make_optimizer(sae, cfg), cfg)
    feats = F.normalize(torch.randn(32, d), dim=1)

    def rows(m):
        return ((torch.rand(m, 32) < 0.1) * (0.5 + torch.rand(m, 32))) @ feats

    train_l0 = []
    for i in range(400):
        out = step(rows(256))
        if i >= 300:
            train_l0.append(float(out["l0"]))
    sae.eval()
    with torch.no_grad():
        held = (sae.encode(rows(8192)) > 0).sum(1).float().mean().item()
    assert held == pytest.approx(sum(train_l0) / len(train_l0), rel=0.10)


def test_matryoshka_loss_is_the_sum_of_its_prefix_losses():
    sae = tiny("matryoshka", k=3, widths=[2, 5, N])
    x = torch.randn(30, D)
    t = sae.loss(x)
    f = t.f
    total = 0.0
    for w in (2, 5, N):
        rec = f[:, :w] @ sae.W_dec[:w] + sae.b_dec
        total = total + (x - rec).pow(2).sum(-1).mean()
    torch.testing.assert_close(t.overall, total)
    torch.testing.assert_close(t.mse, (x - t.x_hat).pow(2).sum(-1).mean())


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("transcoder", [False, True])
def test_sparse_kernel_matches_dense_for_k_sparse_kinds(arch, transcoder):
    kw = {"kind": "transcoder", "d_out": 5, "skip": True} if transcoder else {}
    dense, fast = (tiny(arch, k=2, **kw) for _ in range(2))
    fast.kernel = "sparse"
    x, y = torch.randn(24, D), torch.randn(24, 5 if transcoder else D)
    dead = torch.arange(N) < 4
    a = dense.loss(x, target=y, dead_mask=dead, aux_k=3)
    b = fast.loss(x, target=y, dead_mask=dead, aux_k=3)
    torch.testing.assert_close(a.overall, b.overall)
    a.overall.backward()
    b.overall.backward()
    for n in dense.param_names():
        torch.testing.assert_close(getattr(fast, n).grad, getattr(dense, n).grad, msg=n)


@pytest.mark.parametrize("override,key", [
    ({"architecture": "batchtopk", "k": 65}, "sae.k`=65"),
    ({"architecture": "matryoshka", "matryoshka_widths": [32, 16, 64]},
     "sae.matryoshka_widths`=[32, 16, 64]"),
    ({"architecture": "matryoshka", "matryoshka_widths": [16, 32]}, "sae.matryoshka_widths`=[16, 32]"),
    ({"architecture": "jumprelu", "bandwidth": 0.0}, "sae.bandwidth`=0.0"),
    ({"architecture": "jumprelu", "threshold_init": -1.0}, "sae.threshold_init`=-1.0"),
    ({"kind": "transcoder"}, "sae.kind`=transcoder"),
])
def test_bad_config_is_one_line_naming_the_key(override, key):
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace("]", r"\]")) as e:
        SAETrainConfig(n_features=64, **override).check()
    assert "\n" not in str(e.value)
