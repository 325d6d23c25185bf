"""saprmarks/dictionary_learning folders: `ae.pt` (a state dict) + `config.json` (`trainer` block).

Read with `torch.load(weights_only=True)`; `trainer.dict_class` picks the formulas, taken from
`dictionary_learning/dictionary.py` and `trainers/{top_k,batch_top_k,matryoshka_batch_top_k}.py` (0.1.0),
each class's default `encode` and `from_pretrained`:
- AutoEncoder: `relu(encoder(x - bias))`, `decoder(f) + bias`; `from_pretrained` normalizes the decoder
  columns and scales the encoder rows and bias by the same norms, so codes are per unit direction;
- GatedAutoEncoder: `x_enc = encoder(x - decoder_bias)`, `1[x_enc + gate_bias > 0] *
  relu(exp(r_mag) * x_enc + mag_bias)`;
- JumpReluAutoEncoder: `relu(pre) * (pre > threshold)`, `pre = x @ W_enc + b_enc` (no b_dec subtraction);
- AutoEncoderTopK: top k of `relu(encoder(x - b_dec))` per row;
- BatchTopKSAE, MatryoshkaBatchTopKSAE: `relu(pre) * (relu(pre) > threshold)` with the stored scalar
  threshold (the inference default `use_threshold=True`), `pre` from `x - b_dec`.
`norm_factor` is folded into the biases before saving (`scale_biases`), so no input scaling remains.
The hook is `blocks.<layer>.hook_resid_post` (as SAELens' dictionary_learning loader assumes), or
`hook_mlp_out` when `submodule_name` names an MLP.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from autoencoder.dictionaries.base import Dictionary, Weights, require
from tools.core.config import UserError
from tools.core.files import read_json, sha256_file

WEIGHTS_FILE = "ae.pt"
CFG_FILE = "config.json"
ARCHITECTURES = {"AutoEncoder": "standard", "GatedAutoEncoder": "gated", "JumpReluAutoEncoder": "jumprelu",
                 "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                 "MatryoshkaBatchTopKSAE": "matryoshka"}


def matches(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / CFG_FILE).is_file()


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)`; a pickle it refuses, or a non-dict, is one UserError line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a plain tensor state dict that torch.load(weights_only=True) accepts "
                        f"({str(e).splitlines()[0][:200]})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return state


def _weights(dict_class: str, s: dict[str, torch.Tensor], d: int, f: int, k: int | None,
             where: str) -> Weights:
    arch = ARCHITECTURES[dict_class]
    if dict_class == "JumpReluAutoEncoder":
        return Weights(arch, require(s, "W_enc", (d, f), where), require(s, "b_enc", (f,), where),
                       require(s, "W_dec", (f, d), where), require(s, "b_dec", (d,), where),
                       activation="jumprelu", threshold=require(s, "threshold", (f,), where))
    if dict_class == "GatedAutoEncoder":
        b_dec = require(s, "decoder_bias", (d,), where)
        return Weights(arch, require(s, "encoder.weight", (f, d), where).T, torch.zeros(f),
                       require(s, "decoder.weight", (d, f), where).T, b_dec, activation="gated",
                       pre_bias=b_dec,
                       b_gate=require(s, "gate_bias", (f,), where), r_mag=require(s, "r_mag", (f,), where),
                       b_mag=require(s, "mag_bias", (f,), where))
    if dict_class == "AutoEncoder":
        W_enc = require(s, "encoder.weight", (f, d), where).T
        b_enc = require(s, "encoder.bias", (f,), where)
        W_dec = require(s, "decoder.weight", (d, f), where).T
        norms = W_dec.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms)):
            W_dec, W_enc, b_enc = W_dec / norms[:, None], W_enc * norms, b_enc * norms
        b_dec = require(s, "bias", (d,), where)
        return Weights(arch, W_enc, b_enc, W_dec, b_dec, pre_bias=b_dec)
    if dict_class == "MatryoshkaBatchTopKSAE":
        W_enc, b_enc = require(s, "W_enc", (d, f), where), require(s, "b_enc", (f,), where)
        W_dec = require(s, "W_dec", (f, d), where)
    else:
        W_enc, b_enc = require(s, "encoder.weight", (f, d), where).T, require(s, "encoder.bias", (f,), where)
        W_dec = require(s, "decoder.weight", (d, f), where).T
    b_dec = require(s, "b_dec", (d,), where)
    if dict_class == "AutoEncoderTopK":
        return Weights(arch, W_enc, b_enc, W_dec, b_dec, activation="topk", k=k, pre_bias=b_dec)
    if "threshold" not in s:
        raise UserError(f"{where}: {dict_class} without a 'threshold' tensor (found: {', '.join(sorted(s))})")
    threshold = require(s, "threshold", (), where).expand(f).clone()
    return Weights(arch, W_enc, b_enc, W_dec, b_dec, activation="jumprelu", threshold=threshold,
                   pre_bias=b_dec, k=k)


def load(folder: Path, hook: str | None, source: str) -> Dictionary:
    """Load a dictionary_learning trainer folder (see the module docstring)."""
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    trainer = read_json(cfg_path, "dictionary_learning config").get("trainer") or {}
    dict_class = trainer.get("dict_class")
    if dict_class not in ARCHITECTURES:
        raise UserError(f"{cfg_path}: trainer.dict_class {dict_class!r} is not supported "
                        f"(known: {', '.join(ARCHITECTURES)})")
    try:
        d, f = int(trainer["activation_dim"]), int(trainer["dict_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: missing or bad trainer.activation_dim/dict_size ({e})") from e
    state = read_state(weights_path)
    k = trainer.get("k")
    if "k" in state and state["k"].numel() == 1:
        k = int(state["k"].item())
    w = _weights(dict_class, state, d, f, k, str(weights_path))
    w.meta = {"dict_class": dict_class, "trainer_class": trainer.get("trainer_class"),
              "submodule_name": trainer.get("submodule_name")}
    layer = trainer.get("layer")
    site = "hook_mlp_out" if "mlp" in str(trainer.get("submodule_name") or "").lower() else "hook_resid_post"
    hook_in = hook or (f"blocks.{int(layer)}.{site}" if isinstance(layer, int) else None)
    return Dictionary(w, hook_in=hook_in, hook_out=hook_in, source_format="dictionary_learning",
                      source=source, sha256=sha256_file(weights_path), model_name=trainer.get("lm_name"),
                      where=str(weights_path))
