"""`load_dictionary` against the libraries that wrote the folders (the optional `compat` extra).

Each folder is written by the library's own save code from random weights, read back by the
library's own loader, and compared with `load_dictionary` on the same inputs. Skipped, with the
reason, where a library is not installed (`pip install -e .[compat]`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from autoencoder import load_dictionary

D, F, DOUT = 16, 64, 24
TOL = {"atol": 1e-5, "rtol": 1e-5}


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def inputs(d: int = D, n: int = 40) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 2


# --------------------------------------------------------------------------------------------- SAELens

def saelens_cases():
    sl = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e .[compat])")
    from sae_lens.saes.sae import SAEMetadata

    def meta(**kw):
        return SAEMetadata(model_name="gpt2", hook_name="blocks.3.hook_resid_post", **kw)

    return sl, {
        "standard": lambda: sl.StandardSAE(sl.StandardSAEConfig(d_in=D, d_sae=F, metadata=meta())),
        "standard_no_b_dec": lambda: sl.StandardSAE(sl.StandardSAEConfig(d_in=D, d_sae=F, metadata=meta(),
                                                                         apply_b_dec_to_input=False)),
        "standard_layer_norm": lambda: sl.StandardSAE(sl.StandardSAEConfig(
            d_in=D, d_sae=F, metadata=meta(), normalize_activations="layer_norm")),
        "standard_constant_norm_rescale": lambda: sl.StandardSAE(sl.StandardSAEConfig(
            d_in=D, d_sae=F, metadata=meta(), normalize_activations="constant_norm_rescale")),
        "topk": lambda: sl.TopKSAE(sl.TopKSAEConfig(d_in=D, d_sae=F, k=6, metadata=meta())),
        "topk_rescaled": lambda: sl.TopKSAE(sl.TopKSAEConfig(d_in=D, d_sae=F, k=6, metadata=meta(),
                                                             rescale_acts_by_decoder_norm=True)),
        "jumprelu": lambda: sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D, d_sae=F, metadata=meta())),
        "gated": lambda: sl.GatedSAE(sl.GatedSAEConfig(d_in=D, d_sae=F, metadata=meta())),
        "transcoder": lambda: sl.Transcoder(sl.TranscoderConfig(
            d_in=D, d_sae=F, d_out=DOUT, apply_b_dec_to_input=False,
            metadata=meta(hook_name_out="blocks.3.hook_mlp_out"))),
        "skip_transcoder": lambda: sl.SkipTranscoder(sl.SkipTranscoderConfig(
            d_in=D, d_sae=F, d_out=DOUT, apply_b_dec_to_input=False,
            metadata=meta(hook_name_out="blocks.3.hook_mlp_out"))),
        "jumprelu_transcoder": lambda: sl.JumpReLUTranscoder(sl.JumpReLUTranscoderConfig(
            d_in=D, d_sae=F, d_out=DOUT, apply_b_dec_to_input=False,
            metadata=meta(hook_name_out="blocks.3.hook_mlp_out"))),
    }


CASES = ["standard", "standard_no_b_dec", "standard_layer_norm", "standard_constant_norm_rescale", "topk",
         "topk_rescaled", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder"]


@pytest.mark.parametrize("case", CASES)
def test_saelens(tmp_path, case):
    sl, cases = saelens_cases()
    sae = cases[case]()
    randomize(sae)
    if hasattr(sae, "threshold"):
        with torch.no_grad():
            sae.threshold.abs_()
    sae.save_model(tmp_path / case)
    theirs = sl.SAE.load_from_disk(str(tmp_path / case), device="cpu")
    ours = load_dictionary(tmp_path / case)
    transcoder = "transcoder" in case
    assert ours.source_format == "saelens"
    assert ours.architecture == sae.cfg.architecture()
    assert (ours.d_in, ours.d_sae, ours.d_out) == (D, F, DOUT if transcoder else D)
    assert ours.hook_in == "blocks.3.hook_resid_post"
    assert ours.hook_out == ("blocks.3.hook_mlp_out" if transcoder else "blocks.3.hook_resid_post")
    assert ours.model_name == "gpt2"
    x = inputs()
    with torch.no_grad():
        f = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), f, **TOL)
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert 0 < (f > 0).float().mean() < 1


def test_saelens_batchtopk_saved_as_jumprelu(tmp_path):
    sl, _ = saelens_cases()
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=6))
    randomize(sae)
    with torch.no_grad():
        sae.topk_threshold.fill_(0.8)
    sae.save_inference_model(tmp_path / "btk")
    theirs = sl.SAE.load_from_disk(str(tmp_path / "btk"), device="cpu")
    ours = load_dictionary(tmp_path / "btk", hook="blocks.1.hook_mlp_out")
    assert (ours.architecture, ours.hook_in) == ("jumprelu", "blocks.1.hook_mlp_out")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_saelens_checkpoint_scaler_folded(tmp_path):
    """A training checkpoint's activation_scaler.json: folded as SAELens folds it after training."""
    sl, cases = saelens_cases()
    sae = cases["standard"]()
    randomize(sae)
    sae.save_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    theirs = sl.SAE.load_from_disk(str(tmp_path / "ckpt"), device="cpu")
    theirs.fold_activation_norm_scaling_factor(2.5)
    ours = load_dictionary(tmp_path / "ckpt")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


# -------------------------------------------------------------------------------------------- sparsify

@pytest.mark.parametrize("hookpoint,transcode,skip,activation", [
    ("layers.3", False, False, "topk"),
    ("layers.3", False, False, "groupmax"),
    ("layers.2.mlp", True, True, "topk"),
])
def test_sparsify(tmp_path, hookpoint, transcode, skip, activation):
    sp = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e .[compat])")
    cfg = sp.SparseCoderConfig(num_latents=F, k=8, transcode=transcode, skip_connection=skip,
                               activation=activation)
    coder = sp.SparseCoder(D, cfg)
    randomize(coder)
    coder.save_to_disk(tmp_path / hookpoint)
    theirs = sp.SparseCoder.load_from_disk(tmp_path / hookpoint)
    ours = load_dictionary(tmp_path / hookpoint)
    layer = hookpoint.split(".")[1]
    expect_in = {"layers.3": "blocks.3.hook_resid_post", "layers.2.mlp": "blocks.2.ln2.hook_normalized"}
    expect_out = {"layers.3": "blocks.3.hook_resid_post", "layers.2.mlp": "blocks.2.hook_mlp_out"}
    assert (ours.source_format, ours.d_in, ours.d_sae, ours.d_out, ours.k) == ("sparsify", D, F, D, 8)
    assert (ours.hook_in, ours.hook_out) == (expect_in[hookpoint], expect_out[hookpoint])
    assert layer in ours.hook_in
    x = inputs()
    with torch.no_grad():
        acts, idx, _ = theirs.encode(x)
        dense = torch.zeros(x.shape[0], F).scatter_(-1, idx, acts)
        torch.testing.assert_close(ours.encode(x), dense, **TOL)
        y = theirs.decode(acts, idx)
        if skip:
            y = y + x @ theirs.W_skip.mT
        torch.testing.assert_close(ours(x), y, **TOL)


# --------------------------------------------------------------------------------- dictionary_learning

@pytest.fixture(scope="module")
def dl_modules():
    """dictionary_learning's modules without its package `__init__` (which imports nnsight)."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("dictionary-learning is not installed (pip install --no-deps dictionary-learning)")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k.startswith("dictionary_learning")}
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    try:
        mods = {n: importlib.import_module(f"dictionary_learning.{n}") for n in
                ("dictionary", "trainers.top_k", "trainers.batch_top_k", "trainers.matryoshka_batch_top_k")}
        yield mods
    finally:
        for k in [k for k in sys.modules if k.startswith("dictionary_learning")]:
            del sys.modules[k]
        sys.modules.update(saved)


DL = {"AutoEncoder": ("dictionary", lambda c: c(D, F)),
      "GatedAutoEncoder": ("dictionary", lambda c: c(D, F)),
      "JumpReluAutoEncoder": ("dictionary", lambda c: c(D, F)),
      "AutoEncoderTopK": ("trainers.top_k", lambda c: c(D, F, 6)),
      "BatchTopKSAE": ("trainers.batch_top_k", lambda c: c(D, F, 6)),
      "MatryoshkaBatchTopKSAE": ("trainers.matryoshka_batch_top_k", lambda c: c(D, F, 6, [16, 16, 32]))}


@pytest.mark.parametrize("dict_class", list(DL))
def test_dictionary_learning(tmp_path, dl_modules, dict_class):
    module, make = DL[dict_class]
    cls = getattr(dl_modules[module], dict_class)
    ae = make(cls)
    randomize(ae)
    if hasattr(ae, "threshold"):
        with torch.no_grad():
            ae.threshold.copy_(ae.threshold.abs() if ae.threshold.dim() else torch.tensor(0.6))
    torch.save(ae.state_dict(), tmp_path / "ae.pt")  # what dictionary_learning.training saves
    trainer = {"dict_class": dict_class, "activation_dim": D, "dict_size": F, "k": 6, "layer": 2,
               "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_2"}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    theirs = cls.from_pretrained(str(tmp_path / "ae.pt"))
    ours = load_dictionary(tmp_path)
    assert (ours.source_format, ours.d_sae) == ("dictionary_learning", F)
    assert ours.hook_in == "blocks.2.hook_resid_post"
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
