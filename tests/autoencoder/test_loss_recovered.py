"""Loss recovered through the Subject: splice into one hook point, zero- or mean-ablate it."""

from __future__ import annotations

import pytest
import torch

from autoencoder.metrics import loss_recovered, nll_scores
from tools.core.config import UserError
from transformer.model import GPT, GPTConfig
from transformer.subject import GPTSubject

KEY = "metrics/loss_recovered"
G = "model_performance_preservation/"


class Noisy(torch.nn.Module):
    """A stand-in SAE whose reconstruction is the input plus noise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama():
    from tests.helpers.subjects import hf_subject, tiny_hf

    return hf_subject(tiny_hf("llama"))


def test_identity_splice_recovers_everything_on_hf(llama):
    ctx = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(0))
    for hook in ("blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"):
        out = loss_recovered(llama, torch.nn.Identity(), ctx, hook)
        assert out[KEY] == 1.0 and out[G + "ce_loss_with_sae"] == out[G + "ce_loss_without_sae"]
        assert out[G + "ce_loss_with_ablation"] != out[G + "ce_loss_without_sae"]
        noisy = loss_recovered(llama, Noisy(), ctx, hook)  # the splice takes effect (a random model's
        assert noisy[G + "ce_loss_with_sae"] != out[G + "ce_loss_with_sae"]  # losses order arbitrarily)
        names = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation")
        l_o, l_r, l_a = (noisy[G + k] for k in names)
        assert noisy[KEY] == pytest.approx((l_a - l_r) / (l_a - l_o))
    zero = loss_recovered(llama, Noisy(), ctx, "blocks.1.mlp.hook_post")
    mean = loss_recovered(llama, Noisy(), ctx, "blocks.1.mlp.hook_post", ablation="mean")
    assert mean[G + "ce_loss_with_ablation"] != zero[G + "ce_loss_with_ablation"]
    with pytest.raises(UserError, match="layers 0..2"):
        loss_recovered(llama, Noisy(), ctx, "blocks.9.mlp.hook_post")


def test_gpt_entry_point_matches_the_models_own_edit():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    ctx = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    out = nll_scores(model, Noisy(), ctx, 0)
    with torch.no_grad():
        idx, tgt = ctx[:, :-1].contiguous(), ctx[:, 1:].contiguous()
        _, l_orig = model(idx, tgt)
        _, l_zero = model(idx, tgt, mlp_edit=lambda i, h: torch.zeros_like(h))
    assert out[G + "ce_loss_without_sae"] == pytest.approx(float(l_orig), rel=1e-6)
    assert out[G + "ce_loss_with_ablation"] == pytest.approx(float(l_zero), rel=1e-6)
    assert loss_recovered(GPTSubject(model), torch.nn.Identity(), ctx, "blocks.0.mlp.hook_post")[KEY] == 1.0


def test_val_contexts_read_the_dtype_of_meta_json(tmp_path):
    import numpy as np

    from autoencoder.metrics import val_contexts
    from tools.core.files import write_json

    ids = np.arange(70_000, 70_100, dtype=np.uint32)  # beyond uint16
    ids.tofile(tmp_path / "val.bin")
    write_json(tmp_path / "meta.json", {"dtype": "uint32"})
    ctx = val_contexts(tmp_path / "val.bin", 3, 9)
    assert ctx.shape == (3, 10) and int(ctx[0, 0]) == 70_000 and int(ctx[-1, -1]) == 70_099
