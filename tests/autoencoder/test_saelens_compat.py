"""Our SAE export loads in SAELens unchanged and computes the same features (opt-in check).

SAELens is not a dependency; run with
`pip install sae-lens && pytest tests/autoencoder/test_saelens_compat.py`
(last run against sae-lens 6.54.12: l1 -> StandardSAE and topk -> TopKSAE, exact match).
"""

import pytest
import torch

from autoencoder.sae import SAEModelConfig, build_sae, save_sae

sae_lens = pytest.importorskip("sae_lens")


@pytest.mark.parametrize("arch,k", [("standard", None), ("topk", 16)])
def test_export_loads_in_sae_lens(tmp_path, arch, k):
    torch.manual_seed(0)
    ours = build_sae(SAEModelConfig(arch, d_in=64, d_sae=128, k=k))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (64, 128)
    x = torch.randn(32, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))
        torch.testing.assert_close(theirs.decode(ours.encode(x)), ours(x))
