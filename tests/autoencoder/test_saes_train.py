"""Training every architecture end to end on planted shards: figures, export, exact resume, and a
transcoder on paired folders (and its refusal of folders that do not share rows)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from autoencoder import load_dictionary, train
from autoencoder.sae import load_sae
from tests.helpers.planted import clone_run, planted_run, sae_cfg
from tools.core.config import UserError

ARCHS = {"batchtopk": ["sae.k=2"], "jumprelu": ["sae.l0_coeff=0.05"],
         "matryoshka": ["sae.k=2", "sae.matryoshka_widths=[8,32,64]"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    planted_run(root)
    return root


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trains_exports_and_resumes_exactly(planted, tmp_path, arch, capsys):
    common = [f"sae={arch}", *ARCHS[arch], "sae.steps=300", "sae.dead_tokens=6400", "sae.eval_every=1000",
              "sae.checkpoint_every=1000", "sae.name=r"]
    a = clone_run(planted, tmp_path / "a")
    s = train.run(sae_cfg(a, *common))
    print(f"{arch}: L0 {s['l0']:.2f} FVU {1 - s['explained_variance']:.4f} dead {s['dead_fraction']:.3f}")
    assert s["explained_variance"] > 0.5 and 0.5 <= s["l0"] <= 16
    b = clone_run(planted, tmp_path / "b")
    assert train.run(sae_cfg(b, *common, "sae.stop_at=130"))["stopped_at"] == 130
    train.run(sae_cfg(b, *common))
    wa, wb = (load_file(str(r / "sae/r/sae_weights.safetensors")) for r in (a, b))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    meta = json.loads((a / "sae/r/cfg.json").read_text())
    assert meta["model"]["architecture"] == arch
    assert meta["architecture"] == "jumprelu"  # SAELens loads all three as JumpReLU
    sae = load_sae(a / "sae/r")
    d = load_dictionary("r", run_dir=a)
    x = torch.randn(50, 16)
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d(x), sae(x), atol=1e-5, rtol=1e-5)


def test_sae_names():
    from autoencoder.config import SAETrainConfig

    assert train.sae_name(SAETrainConfig(architecture="jumprelu", n_features=64)) == "jumprelu-64-l0c1e-3"
    assert train.sae_name(SAETrainConfig(architecture="batchtopk", n_features=64, k=4)) == "batchtopk-64-k4"
    assert train.sae_name(SAETrainConfig(architecture="topk", kind="transcoder", hook_in="a", hook_out="b",
                                         n_features=64, k=4)) == "tc-topk-64-k4"


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    planted_run(root, hooks=("blocks.0.in", "blocks.0.out"))
    return root


@pytest.mark.parametrize("arch,extra", [("topk", ["sae.k=3"]), ("batchtopk", ["sae.k=3", "sae.skip=true"])])
def test_transcoder_trains_on_paired_folders(paired, tmp_path, arch, extra):
    run = clone_run(paired, tmp_path / "run")
    common = [f"sae={arch}", "sae.kind=transcoder", "sae.hook_in=blocks.0.in", "sae.hook_out=blocks.0.out",
              "sae.resample_steps=[]", "sae.steps=300", "sae.dead_tokens=6400", "sae.eval_every=1000",
              *extra]
    s = train.run(sae_cfg(run, *common))
    assert s["explained_variance"] > 0.5, s
    sae = load_sae(run / "sae" / s["name"])
    assert sae.transcoder and sae.cfg.hook_name_out == "blocks.0.out"


def test_transcoder_refuses_folders_that_do_not_share_rows(tmp_path):
    planted_run(tmp_path / "p", hooks=("blocks.0.in",))
    planted_run(tmp_path / "q", rows=18000, hooks=("x", "blocks.0.out"))
    (tmp_path / "p/activations/train/blocks.0.out").symlink_to(tmp_path / "q/activations/train/blocks.0.out")
    with pytest.raises(UserError, match="do not hold the same rows"):
        train.run(sae_cfg(tmp_path / "p", "sae=topk", "sae.k=3", "sae.kind=transcoder",
                          "sae.hook_in=blocks.0.in", "sae.hook_out=blocks.0.out", "sae.steps=5"))
