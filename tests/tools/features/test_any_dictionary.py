"""Any dictionary through the features and describe stages, on any hook point.

* SAELens and sparsify folders on a tiny Hugging Face Llama's residual stream, through
  `python -m tools.top_activations subject=hf ... features.sae=<folder>` and `tools.describe` (saved
  by the real libraries where the `compat` extra is installed, written file by file otherwise);
* a Gemma Scope JumpReLU (`features.sae_hook`, its files record no hook) on our GPT's residual
  stream against brute force, its logit effects through the final norm and the unembedding;
* our own SAE trained on `activations.hook=resid_post` shards, end to end, on our GPT and on the Llama;
* bad input: width, hook, no hook recorded, the model name (a warning).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from autoencoder import load_dictionary
from tests.helpers import ROOT
from tests.helpers.features import T, check_against_brute_force, make_run, overrides, records
from tests.helpers.pipeline import TINY, write_corpus
from tools import top_activations as ta
from tools.core.config import UserError, compose
from tools.core.files import sha256_file
from tools.describe import stage as describe
from tools.features import scan as fscan
from transformer.model import load_model
from transformer.subject import GPTSubject

D_LLAMA = 32
F = 48
SMALL = ["features.contexts=64", "features.context_len=32", "features.window=4", "features.top_k=8",
         "features.per_bin=1", "features.n_random=6", "features.n_uniform=3",
         "features.negative_candidates=16", "features.logit_k=3",
         "describe.chunk_units=8", "describe.max_units=16", "describe.site=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _stage(module: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=600)


def _rand(*shape: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------------------------ builders

# a random Llama's residual stream is small (embeddings of std 0.02): large encoder weights and small
# biases give features that fire on some tokens, not on all or none
SCALES = {"W_enc": 4.0, "b_enc": 0.01, "b_dec": 0.01, "encoder.weight": 4.0, "encoder.bias": 0.01}


def _weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: _rand(*shape, seed=len(name), scale=SCALES.get(name, 0.3))
            for name, shape in shapes.items()}


def _randomize(module: torch.nn.Module) -> None:
    weights = _weights({name: tuple(p.shape) for name, p in module.named_parameters()})
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(weights[name])


def saelens_folder(folder: Path, d_in: int, hook: str, model_name: str) -> Path:
    """A SAELens v6 standard SAE: saved by sae_lens when installed, else its two files written directly."""
    try:
        import sae_lens as sl
        from sae_lens.saes.sae import SAEMetadata
    except ImportError:
        sl = None
    if sl is not None:
        meta = SAEMetadata(model_name=model_name, hook_name=hook)
        sae = sl.StandardSAE(sl.StandardSAEConfig(d_in=d_in, d_sae=F, metadata=meta))
        _randomize(sae)
        sae.save_model(folder)
        return folder
    folder.mkdir(parents=True)
    save_file(_weights({"W_enc": (d_in, F), "W_dec": (F, d_in), "b_dec": (d_in,), "b_enc": (F,)}),
              str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "model_name": model_name, "hook_name": hook}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def sparsify_folder(parent: Path, layer: int, d_in: int) -> Path:
    """A sparsify TopK coder on `layers.<layer>` (the residual stream after that layer)."""
    folder = parent / f"layers.{layer}"
    try:
        import sparsify as sp
    except ImportError:
        sp = None
    if sp is not None:
        coder = sp.SparseCoder(d_in, sp.SparseCoderConfig(num_latents=F, k=6))
        _randomize(coder)
        coder.save_to_disk(folder)
        return folder
    folder.mkdir(parents=True)
    save_file(_weights({"encoder.weight": (F, d_in), "encoder.bias": (F,), "W_dec": (F, d_in),
                        "b_dec": (d_in,)}), str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "num_latents": F, "k": 6,
                                                 "activation": "topk", "transcode": False}))
    return folder


def gemma_scope_folder(folder: Path, d_in: int, d_sae: int = 64) -> Path:
    """A Gemma Scope v1 params.npz in a folder whose path names no layer nor site (no hook recorded)."""
    folder.mkdir(parents=True)
    W_enc = _rand(d_in, d_sae, seed=20, scale=1.0)
    np.savez(folder / "params.npz", W_enc=W_enc.numpy(), W_dec=_rand(d_sae, d_in, seed=21).numpy(),
             b_enc=_rand(d_sae, seed=22).numpy(), b_dec=_rand(d_in, seed=23).numpy(),
             threshold=(0.5 + _rand(d_sae, seed=24).abs()).numpy())
    return folder


# ----------------------------------------------------------------------------- a tiny HF Llama

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer, and its val/train tokens of a local corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.tokenizers import byte_level
    from transformer import prepare

    root = tmp_path_factory.mktemp("anydict-llama")
    model = root / "tiny-llama"
    byte_level(model)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=D_LLAMA, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(model)
    write_corpus(root / "corpus")
    base = [f"run_dir={root / 'run'}", f"data_dir={root / 'data'}", "device=cpu", "wandb.mode=disabled",
            "subject=hf", f"subject.model={model}", "data=local", f"data.files={root}/corpus/*.txt",
            "data.val_fraction=0.3", "data.num_proc=1", *SMALL]
    prepare.run(compose(base))
    return root, base


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_external_folder_on_hf_llama(llama, tmp_path, fmt):
    root, base = llama
    hook = "blocks.1.hook_resid_post"
    if fmt == "saelens":
        folder = saelens_folder(tmp_path / "saelens-resid", D_LLAMA, hook, str(root / "tiny-llama"))
    else:
        folder = sparsify_folder(tmp_path / "sparsify-run", 1, D_LLAMA)
    args = [*base, f"features.sae={folder}"]
    p = _stage("tools.top_activations", args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning" not in p.stderr  # the recorded model is the subject
    name = folder.name
    out = root / "run" / "features" / name
    meta = json.loads((out / "meta.json").read_text())
    weights = folder / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")
    d = meta["dictionary"]
    assert (d["source"], d["format"], d["hook_in"]) == (str(folder), fmt, hook)
    assert (d["d_in"], d["d_sae"]) == (D_LLAMA, F)
    assert d["sha256"] == sha256_file(weights) and meta["hook_name"] == hook and meta["layer"] == 1
    assert meta["logit_path"] == "residual" and meta["n_units"] == F
    assert meta["inputs"]["sae"] == str(weights)
    index = (out / "site" / "index.html").read_text()
    assert '"dictionary"' in index and d["sha256"] in index and 'id="provenance"' in index

    # the scan against the dictionary applied to the subject's own residual stream
    from transformer.subject_load import load_subject

    cfg = compose(args)
    subject = load_subject(cfg, "cpu")
    toks = np.fromfile(next((root / "data").glob("*/val.bin")), dtype=np.uint16).astype(np.int64)
    idx = torch.from_numpy(toks[: meta["contexts"] * meta["context_len"]]).view(meta["contexts"], -1)
    with torch.no_grad():
        f = load_dictionary(folder).encode(subject.capture(idx, [hook])[hook])
    recs = records(root / "run", name)
    assert [r["index"] for r in recs] == list(range(F))
    for r in recs:
        assert r["max_act"] == pytest.approx(max(f[..., r["index"]].max().item(), 0.0), abs=1e-4)
        assert r["density"] == pytest.approx((f[..., r["index"]] > 0).double().mean().item(), abs=1e-9)
    assert sum(r["density"] > 0 for r in recs) > F // 4

    p = _stage("tools.describe", args)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((root / "run" / "descriptions" / name / "summary.json").read_text())
    assert summary["described"] > 0

    # provenance: the features were made from this dictionary file; a changed one is refused by name
    sealed = json.loads((out / "checksums.json").read_text())["inputs"]
    assert sealed["sae"] == {"path": str(weights), "sha256": d["sha256"]}
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(weights))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(weights))
    p = _stage("tools.describe", [*args, "describe.tag=again"])
    assert p.returncode == 2 and str(weights) in p.stderr and "changed since" in p.stderr, p.stderr[-2000:]


def test_ours_on_resid_post_hf_llama(llama):
    """An SAE of ours trained on the Llama's resid_post shards, through features and describe."""
    from autoencoder import generate, train

    root, base = llama
    args = [*base, "activations.hook=resid_post", "activations.layers=[1]", "activations.contexts=48",
            "activations.val_contexts=16", "activations.tokens_per_context=8", "activations.block_size=32",
            "activations.rows_per_shard=128", "activations.resample_rows=96", "activations.batch_contexts=16",
            "sae.name=resid", "sae.n_features=64", "sae.batch_size=32", "sae.steps=24",
            "sae.lr_warmup_steps=2", "sae.checkpoint_every=12", "sae.eval_every=12", "sae.resample_steps=[]",
            "sae.b_dec_init_rows=64", "sae.eval_rows=64", "sae.eval_contexts=4", "sae.eval_context_len=32",
            "sae.log_every=6",
            "sae.kernel=dense", "features.sae=resid"]
    for split in ("train", "val"):
        generate.run(compose([*args, f"activations.split={split}"]))
    train.run(compose(args))
    assert json.loads((root / "run" / "sae" / "resid" / "cfg.json").read_text())["hook_name"] == \
        "blocks.1.hook_resid_post"
    result = ta.run(compose(args))
    meta = json.loads((root / "run" / "features" / "resid" / "meta.json").read_text())
    assert result["units"] == 64 and meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["dictionary"]["format"] == "ours" and meta["logit_path"] == "residual"
    assert meta["sae_metrics"]  # our training metrics travel with our own SAEs
    assert describe.run(compose(args))["described"] > 0


# ------------------------------------------------------------------------------------ our tiny GPT

@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("anydict-gpt"))


def test_gemma_scope_on_gpt_resid_matches_brute_force(gpt, tmp_path):
    run_dir, data_dir = gpt
    folder = gemma_scope_folder(tmp_path / "gs", 32)
    hook = "blocks.0.hook_resid_post"
    cfg = compose(overrides(run_dir, data_dir, f"features.sae={folder}", f"features.sae_hook={hook}"))
    result = ta.run(cfg)
    assert result["name"] == "gs" and result["units"] == 64
    meta = json.loads((run_dir / "features" / "gs" / "meta.json").read_text())
    assert (meta["dictionary"]["format"], meta["hook_name"], meta["logit_path"]) == (
        "gemmascope_v1", hook, "residual")
    model = load_model(run_dir / "transformer")
    toks = np.fromfile(data_dir / "tiny" / "val.bin", dtype=np.uint16).astype(np.int64)
    n = len(toks) // T
    d = load_dictionary(folder, hook=hook)
    with torch.no_grad():
        f = d.encode(GPTSubject(model).capture(torch.from_numpy(toks[: n * T]).view(n, T), [hook])[hook])
    recs = records(run_dir, "gs")
    cand = fscan.candidate_contexts(f.shape[0], meta["negative_candidates"], int(cfg.seed))
    check_against_brute_force(recs, f, toks, n_random=20, cand=cand)
    with torch.no_grad():  # residual directions: the final LayerNorm's scale, then W_U
        full = (d.decoder_directions() * model.transformer.ln_f.weight) @ model.lm_head.weight[:50257].t()
    for rec in recs[:8]:
        top = full[rec["index"]].topk(10)
        assert [e["id"] for e in rec["logits"]["pos"]] == top.indices.tolist()
        assert [e["value"] for e in rec["logits"]["pos"]] == pytest.approx(top.values.tolist(), rel=1e-4)


def test_ours_on_resid_post_gpt(tmp_path):
    """Our GPT trained, resid_post shards, an SAE on them, its features and descriptions."""
    from autoencoder import generate, train
    from transformer import prepare
    from transformer import train as lm_train

    write_corpus(tmp_path / "corpus")
    base = [f"run_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}",
            f"data.files={tmp_path}/corpus/*.txt", *TINY, "activations.hook=resid_post",
            "sae.resample_steps=[]"]
    prepare.run(compose(base))
    lm_train.run(compose(base))
    for split in ("train", "val"):
        generate.run(compose([*base, f"activations.split={split}"]))
    train.run(compose(base))
    result = ta.run(compose(base))
    meta = json.loads((tmp_path / "run" / "features" / "tiny" / "meta.json").read_text())
    assert result["units"] == 64 and meta["hook_name"] == "blocks.0.hook_resid_post"
    assert meta["dictionary"]["d_in"] == 32 and meta["logit_path"] == "residual"
    assert describe.run(compose(base))["described"] > 0


def test_bad_dictionaries(gpt, tmp_path, capsys):
    run_dir, data_dir = gpt
    narrow = gemma_scope_folder(tmp_path / "narrow", 16)
    with pytest.raises(UserError, match=r"d_in=16 but gpt's blocks\.0\.hook_resid_post has width 32"):
        ta.run(compose(overrides(run_dir, data_dir, f"features.sae={narrow}",
                                 "features.sae_hook=blocks.0.hook_resid_post")))
    wide = gemma_scope_folder(tmp_path / "wide", 32)
    with pytest.raises(UserError, match=r"'blocks\.3\.hook_resid_post': gpt has layers 0\.\.0; hook points "
                                        r"per layer: .*blocks\.<L>\.hook_resid_pre"):
        ta.run(compose(overrides(run_dir, data_dir, f"features.sae={wide}",
                                 "features.sae_hook=blocks.3.hook_resid_post")))
    with pytest.raises(UserError, match=r"features\.sae_hook: unknown hook 'blocks\.0\.attn\.hook_z'"):
        ta.run(compose(overrides(run_dir, data_dir, f"features.sae={wide}",
                                 "features.sae_hook=blocks.0.attn.hook_z")))
    # no hook recorded and none given: one line, exit 2, nothing written
    p = _stage("tools.top_activations", overrides(run_dir, data_dir, f"features.sae={wide}"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "features.sae_hook" in lines[0], p.stderr
    out = run_dir / "features" / "wide"
    assert not (out / "features.jsonl").exists() and not (out / "meta.json").exists()
    # a model name that differs from the subject's: a warning, and the scan goes on
    other = saelens_folder(tmp_path / "named", 32, "blocks.0.hook_resid_post", model_name="gpt2-small")
    capsys.readouterr()
    ta.run(compose(overrides(run_dir, data_dir, f"features.sae={other}", "features.contexts=4")))
    err = capsys.readouterr().err
    assert "warning: dictionary" in err and "'gpt2-small'" in err and "'gpt'" in err


def test_feature_set_names(tmp_path):
    from tools.features.dictionary import external_name, is_external

    hub = "hf:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
    assert is_external(hub) and is_external(str(tmp_path)) and not is_external("l1")
    assert external_name(hub) == "gemma-scope-2b-pt-res--layer_20--width_16k--average_l0_71"
    (tmp_path / "run" / "layers.3").mkdir(parents=True)
    (tmp_path / "run" / "layers.3" / "sae.safetensors").write_bytes(b"")
    assert external_name(f"{tmp_path}/run/layers.3/") == "layers.3"
    assert external_name(f"{tmp_path}/run/layers.3/sae.safetensors") == "layers.3"
