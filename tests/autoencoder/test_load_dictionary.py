"""`load_dictionary` without any compat library: our export, Gemma Scope v1/v2, dictionary_learning and
SAELens folders written in their documented layouts, checked against the published formulas; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from autoencoder import load_dictionary
from autoencoder.sae import load_sae, save_sae
from autoencoder.saes import SAEModelConfig, build_sae
from tools.core.config import UserError

D, F = 16, 48


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def jumprelu_params(d_out: int = D) -> dict[str, np.ndarray]:
    return {"W_enc": rand(D, F).numpy(), "W_dec": rand(F, d_out, seed=1).numpy(),
            "b_enc": rand(F, seed=2).numpy(), "b_dec": rand(d_out, seed=3).numpy(),
            "threshold": rand(F, seed=4).abs().numpy()}


def gemma_formula(p: dict[str, np.ndarray], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gemma Scope tutorial's JumpReLUSAE.encode / decode."""
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = (pre > t["threshold"]) * torch.relu(pre)
    return acts, acts @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("arch,k", [("standard", None), ("topk", 8)])
def test_our_export(tmp_path, arch, k):
    sae = build_sae(SAEModelConfig(arch, d_in=D, d_sae=F, k=k, hook_name="blocks.1.hook_resid_post"))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(rand(*p.shape))
    save_sae(sae, tmp_path / "sae" / "mine")
    d = load_dictionary("mine", run_dir=tmp_path)
    assert (d.source_format, d.architecture, d.d_in, d.d_sae, d.d_out) == ("ours", arch, D, F, D)
    assert d.hook_in == d.hook_out == "blocks.1.hook_resid_post"
    assert len(d.sha256) == 64
    x = rand(20, D, seed=9)
    ref = load_sae(tmp_path / "sae" / "mine")
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), ref.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d(x), ref(x), atol=1e-5, rtol=1e-5)
    assert load_dictionary(tmp_path / "sae" / "mine" / "sae_weights.safetensors").source_format == "ours"


@pytest.mark.parametrize("release,hook_in,hook_out", [
    ("gemma-scope-2b-pt-res", "blocks.5.hook_resid_post", "blocks.5.hook_resid_post"),
    ("gemma-scope-2b-pt-mlp", "blocks.5.hook_mlp_out", "blocks.5.hook_mlp_out"),
    ("gemma-scope-2b-pt-transcoders", "blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out"),
])
def test_gemma_scope_v1(tmp_path, release, hook_in, hook_out):
    folder = tmp_path / release / "layer_5" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    p = jumprelu_params()
    np.savez(folder / "params.npz", **p)
    d = load_dictionary(folder)
    assert (d.source_format, d.hook_in, d.hook_out) == ("gemmascope_v1", hook_in, hook_out)
    assert d.model_name == "google/gemma-2-2b"
    assert d.architecture == ("jumprelu_transcoder" if "transcoders" in release else "jumprelu")
    x = rand(32, D, seed=7) * 3
    f_ref, y_ref = gemma_formula(p, x)
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d(x), y_ref, atol=1e-5, rtol=1e-5)
    assert 0 < (d.encode(x) > 0).float().mean() < 1


def test_gemma_scope_v1_hook_from_caller(tmp_path):
    np.savez(tmp_path / "params.npz", **jumprelu_params())
    assert load_dictionary(tmp_path).hook_in is None
    assert load_dictionary(tmp_path, hook="blocks.2.hook_resid_pre").hook_in == "blocks.2.hook_resid_pre"


def test_gemma_scope_v2_skip_transcoder(tmp_path):
    folder = tmp_path / "transcoder_all" / "layer_3_width_16k_l0_small_affine"
    folder.mkdir(parents=True)
    p = jumprelu_params()
    skip = rand(D, D, seed=5)
    save_file({**{k.lower(): torch.from_numpy(v) for k, v in p.items()}, "affine_skip_connection": skip},
              str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "affine_connection": True,
        "hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.3.post_feedforward_layernorm.output"}))
    d = load_dictionary(folder)
    assert (d.source_format, d.architecture) == ("gemmascope_v2", "jumprelu_skip_transcoder")
    assert (d.hook_in, d.hook_out) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    x = rand(10, D, seed=6)
    f_ref, y_ref = gemma_formula(p, x)
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d(x), y_ref + x @ skip, atol=1e-5, rtol=1e-5)


def write_saelens(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_saelens_pre6_topk_config(tmp_path):
    """A pre-6.0 flat config: hook_point, activation_fn_str topk with activation_fn_kwargs.k."""
    t = {"W_enc": rand(D, F), "b_enc": rand(F, seed=1), "W_dec": rand(F, D, seed=2), "b_dec": rand(D, seed=3)}
    cfg = {"d_in": D, "d_sae": F, "hook_point": "blocks.2.hook_resid_pre", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True, "normalize_activations": False,
           "model_name": "gpt2-small"}
    d = load_dictionary(write_saelens(tmp_path / "s", cfg, t))
    assert (d.source_format, d.architecture, d.k) == ("saelens", "topk", 4)
    assert d.hook_in == "blocks.2.hook_resid_pre"
    assert d.model_name == "gpt2-small"
    x = rand(8, D, seed=4)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    v, i = pre.topk(4, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), torch.zeros_like(pre).scatter(-1, i, v.relu()))


def test_saelens_finetuning_scaling_factor(tmp_path):
    t = {"W_enc": rand(D, F), "b_enc": rand(F, seed=1), "W_dec": rand(F, D, seed=2), "b_dec": rand(D, seed=3),
         "scaling_factor": rand(F, seed=4).abs() + 0.5}
    cfg = {"d_in": D, "d_sae": F, "hook_point": "blocks.0.hook_resid_post", "finetuning_scaling_factor": True}
    d = load_dictionary(write_saelens(tmp_path / "s", cfg, t))
    f = d.encode(rand(4, D))
    torch.testing.assert_close(d.decode(f), (f * t["scaling_factor"]) @ t["W_dec"] + t["b_dec"])
    torch.testing.assert_close(d.decoder_directions(), t["W_dec"] * t["scaling_factor"][:, None])


def dl_folder(tmp_path: Path, dict_class: str, state: dict, **trainer) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp_path / "ae.pt")
    cfg = {"trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": F, "layer": 4,
                       "lm_name": "EleutherAI/pythia-70m-deduped", **trainer}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_dictionary_learning_formulas(tmp_path):
    """BatchTopK with its threshold and AutoEncoder with from_pretrained's decoder normalization."""
    enc, b, dec, b_dec = rand(F, D), rand(F, seed=1), rand(D, F, seed=2), rand(D, seed=3)
    state = {"encoder.weight": enc, "encoder.bias": b, "decoder.weight": dec, "b_dec": b_dec,
             "k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.7)}
    d = load_dictionary(dl_folder(tmp_path / "btk", "BatchTopKSAE", state, k=4))
    assert (d.source_format, d.architecture, d.hook_in, d.model_name) == (
        "dictionary_learning", "batchtopk", "blocks.4.hook_resid_post", "EleutherAI/pythia-70m-deduped")
    x = rand(12, D, seed=4)
    post = torch.relu((x - b_dec) @ enc.T + b)
    torch.testing.assert_close(d.encode(x), post * (post > 0.7))
    torch.testing.assert_close(d(x), d.encode(x) @ dec.T + b_dec)
    state = {"encoder.weight": enc, "encoder.bias": b, "decoder.weight": dec, "bias": b_dec}
    d = load_dictionary(dl_folder(tmp_path / "ae", "AutoEncoder", state))
    f = torch.relu((x - b_dec) @ enc.T + b)
    torch.testing.assert_close(d.encode(x), f * dec.norm(dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d(x), f @ dec.T + b_dec, atol=1e-5, rtol=1e-5)


def test_sparsify_parent_folder(tmp_path):
    for hp in ("layers.1", "layers.2.mlp"):
        folder = tmp_path / hp
        folder.mkdir()
        t = {"encoder.weight": rand(F, D), "encoder.bias": rand(F), "W_dec": rand(F, D), "b_dec": rand(D)}
        save_file(t, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"d_in": D, "num_latents": F, "k": 4}))
    with pytest.raises(UserError, match=r"holds 2 dictionaries \(layers\.1, layers\.2\.mlp\)"):
        load_dictionary(tmp_path)
    d = load_dictionary(tmp_path, hook="blocks.2.hook_mlp_out")
    assert (d.source_format, d.hook_in) == ("sparsify", "blocks.2.hook_mlp_out")
    assert d.meta["hookpoint"] == "layers.2.mlp"
    assert load_dictionary(tmp_path / "layers.1").hook_in == "blocks.1.hook_resid_post"


def test_hub_id(tmp_path, monkeypatch):
    import huggingface_hub

    np.savez(tmp_path / "params.npz", **jumprelu_params())
    (tmp_path / "layer_0").mkdir()
    np.savez(tmp_path / "layer_0" / "params.npz", **jumprelu_params())
    seen = {}

    def fake(repo_id, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    d = load_dictionary("hf:google/gemma-scope-2b-pt-res/layer_0")
    assert seen == {"repo_id": "google/gemma-scope-2b-pt-res", "allow_patterns": ["layer_0/*"]}
    assert d.source == "hf:google/gemma-scope-2b-pt-res/layer_0"

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as e:
        load_dictionary("hf:google/gemma-scope-2b-pt-res/layer_0")
    msg = str(e.value)
    assert "\n" not in msg and "layer_0/*" in msg and "HF_HUB_OFFLINE=1" in msg and "local folder" in msg


# ---------------------------------------------------------------------------------------------- bad input

def files_of(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def expect_error(folder: Path, pattern: str, **kw) -> None:
    before = files_of(folder)
    with pytest.raises(UserError, match=pattern) as e:
        load_dictionary(folder, **kw)
    assert "\n" not in str(e.value)
    assert files_of(folder) == before


def test_no_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hi")
    expect_error(tmp_path, r"no dictionary format matches \(files seen: notes\.txt, weights\.bin; "
                           r"formats known: .*sparsify.*Gemma Scope.*dictionary_learning")


def test_missing_and_misshapen_tensors(tmp_path):
    t = {"W_enc": rand(D, F), "b_enc": rand(F), "W_dec": rand(F, D), "b_dec": rand(D)}
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F, "metadata": {"sae_lens_version": "6.5.0"}}
    write_saelens(tmp_path / "a", cfg, {k: v for k, v in t.items() if k != "b_enc"})
    expect_error(tmp_path / "a", r"required tensor 'b_enc' missing")
    write_saelens(tmp_path / "b", cfg, {**t, "W_dec": rand(F, D + 1)})
    expect_error(tmp_path / "b", r"tensor 'W_dec' has shape \(48, 17\), expected \(48, 16\)")


def test_nan_weights(tmp_path):
    p = jumprelu_params()
    p["W_dec"][3, 2] = np.inf
    np.savez(tmp_path / "params.npz", **p)
    expect_error(tmp_path, r"tensor 'W_dec' holds NaN or inf")


def test_jumprelu_without_threshold(tmp_path):
    p = jumprelu_params()
    del p["threshold"]
    np.savez(tmp_path / "params.npz", **p)
    expect_error(tmp_path, r"JumpReLU dictionary without a 'threshold' tensor")
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": F, "metadata": {"sae_lens_version": "6.5.0"}}
    expect_error(write_saelens(tmp_path / "s", cfg, t), r"JumpReLU dictionary without a 'threshold'")


class Payload:
    pass


def test_pickle_refused(tmp_path):
    state = {"encoder.weight": rand(F, D), "payload": Payload()}
    folder = tmp_path / "dl"
    folder.mkdir()
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder",
                                                                "activation_dim": D, "dict_size": F}}))
    expect_error(folder, r"ae\.pt: not a plain tensor state dict that torch\.load\(weights_only=True\)")


def test_unknown_hook(tmp_path):
    np.savez(tmp_path / "params.npz", **jumprelu_params())
    expect_error(tmp_path, r"hook=: unknown hook 'blocks\.0\.attn\.hook_z'", hook="blocks.0.attn.hook_z")
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F,
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_embed"}}
    t = {"W_enc": rand(D, F), "b_enc": rand(F), "W_dec": rand(F, D), "b_dec": rand(D)}
    expect_error(write_saelens(tmp_path / "s", cfg, t), r"unknown hook 'blocks\.0\.hook_embed'")


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_dictionary(tmp_path / "nope")
