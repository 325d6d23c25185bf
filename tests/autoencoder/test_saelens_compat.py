"""Our SAE export loads in SAELens unchanged and computes the same features (opt-in check).

SAELens is not a dependency; run with
`pip install sae-lens && pytest tests/autoencoder/test_saelens_compat.py`
(last run against sae-lens 6.54.12: l1 -> StandardSAE, topk -> TopKSAE, jumprelu, batchtopk and
matryoshka -> JumpReLUSAE, transcoders -> (JumpReLU)(Skip)Transcoder; exact match).
"""

import pytest
import torch

from autoencoder.sae import save_sae
from autoencoder.saes import SAEModelConfig, build_sae

sae_lens = pytest.importorskip("sae_lens")

ARCHS = [("standard", {}), ("topk", {"k": 16}), ("batchtopk", {"k": 16}), ("jumprelu", {}),
         ("matryoshka", {"k": 16, "widths": [16, 64, 128]})]


def randomised(arch: str, **kw):
    torch.manual_seed(0)
    ours = build_sae(SAEModelConfig(arch, d_in=64, d_sae=128, **kw))
    with torch.no_grad():
        for n in ours.param_names():
            getattr(ours, n).normal_()
        if hasattr(ours, "threshold"):
            ours.threshold.fill_(0.5) if ours.threshold.dim() == 0 else ours.threshold.uniform_(0, 1)
    return ours.eval()


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_export_loads_in_sae_lens(tmp_path, arch, kw):
    ours = randomised(arch, **kw)
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (64, 128)
    x = torch.randn(32, 64)
    with torch.no_grad():
        f = ours.encode(x)
        assert (f > 0).any() and (f == 0).any()
        torch.testing.assert_close(theirs.encode(x), f)
        torch.testing.assert_close(theirs.decode(f), ours(x))


@pytest.mark.parametrize("arch,kw", [a for a in ARCHS if a[0] != "topk"])
@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_export_loads_in_sae_lens(tmp_path, arch, kw, skip):
    ours = randomised(arch, kind="transcoder", d_out=48, hook_name="blocks.0.ln2.hook_normalized",
                      hook_name_out="blocks.0.hook_mlp_out", skip=skip, **kw)
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert (theirs.cfg.d_in, theirs.cfg.d_sae, theirs.cfg.d_out) == (64, 128, 48)
    assert theirs.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
    x = torch.randn(32, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))
        torch.testing.assert_close(theirs(x), ours(x))
