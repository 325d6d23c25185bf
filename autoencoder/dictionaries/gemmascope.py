"""Gemma Scope JumpReLU SAEs and transcoders: v1 `params.npz`; v2 `params.safetensors` + `config.json`.

Formulas from the Gemma Scope tutorial (Lieberum et al. 2024) and SAELens' `gemma_2` / `gemma_3`
loaders: `pre = x @ W_enc + b_enc` (no `b_dec` subtraction), `f = relu(pre) * (pre > threshold)`,
`x_hat = f @ W_dec + b_dec`; v2 stores lower-case names (`w_enc`, `w_dec`, ...) and transcoders with an
`affine_skip_connection` [d_in, d_out] add `x @ affine_skip_connection`.

Hooks: the layer comes from the `layer_N` path part; the site from `hook=`, else from v2's
`hf_hook_point_in`/`hf_hook_point_out`, else from the release or folder name: `-res`/`resid_post` ->
`hook_resid_post`, `-mlp`/`mlp_out` -> `hook_mlp_out`, `-transcoders`/`transcoder` -> the MLP input after
its norm (`ln2.hook_normalized`) to `hook_mlp_out`. Attention-output (`hook_z`) dictionaries are not
supported.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from autoencoder.dictionaries.base import Dictionary, Weights, read_safetensors, require
from tools.core.config import UserError
from tools.core.files import read_json, sha256_file

V1_FILE = "params.npz"
V2_FILE = "params.safetensors"
V2_CFG = "config.json"
_HF_SITES = {r"model\.layers\.(\d+)\.output": "hook_resid_post",
             r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.output": "ln2.hook_normalized",
             r"model\.layers\.(\d+)\.post_feedforward_layernorm\.output": "hook_mlp_out"}


def matches(folder: Path) -> bool:
    return (folder / V1_FILE).is_file() or ((folder / V2_FILE).is_file() and (folder / V2_CFG).is_file())


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: cannot read npz file ({str(e).splitlines()[0]})") from e


def _hf_hook(name: object) -> str | None:
    for pattern, site in _HF_SITES.items():
        m = re.fullmatch(pattern, str(name or ""))
        if m:
            return f"blocks.{m.group(1)}.{site}"
    return None


def _site_from_path(folder: Path) -> tuple[int | None, str | None, bool]:
    """(layer, site of hook_in, is_transcoder) from the `layer_N` part and the release/folder names."""
    text = "/".join(folder.resolve().parts).lower()
    layer = re.findall(r"layer_(\d+)", text)
    n = int(layer[-1]) if layer else None
    if "embedding" in text:
        raise UserError(f"{folder}: embedding dictionaries (hook_embed) are not supported")
    if re.search(r"transcoder|clt", text):
        return n, "ln2.hook_normalized", True
    if re.search(r"-att\b|-att/|attn_out", text):
        raise UserError(f"{folder}: attention-output dictionaries (attn.hook_z) are not supported")
    if re.search(r"-res\b|-res/|resid_post", text):
        return n, "hook_resid_post", False
    if re.search(r"-mlp\b|-mlp/|mlp_out", text):
        return n, "hook_mlp_out", False
    return n, None, False


def _model_name(folder: Path) -> str | None:
    m = re.search(r"gemma-scope-(\d+b)-(pt|it)", "/".join(folder.resolve().parts).lower())
    return f"google/gemma-2-{m.group(1)}" + ("-it" if m.group(2) == "it" else "") if m else None


def load(folder: Path, hook: str | None, source: str) -> Dictionary:
    """Load a Gemma Scope folder (see the module docstring)."""
    v1 = (folder / V1_FILE).is_file()
    path = folder / (V1_FILE if v1 else V2_FILE)
    where = str(path)
    cfg = {} if v1 else read_json(folder / V2_CFG, "Gemma Scope config")
    raw = _read_npz(path) if v1 else read_safetensors(path)
    state = {k.lower(): v for k, v in raw.items()}
    if "w_enc" not in state:
        raise UserError(f"{where}: required tensor 'W_enc' missing (found: {', '.join(sorted(raw))})")
    d_in, d_sae = state["w_enc"].shape
    if "w_dec" not in state or state["w_dec"].ndim != 2:
        require(state, "w_dec", (d_sae, d_in), where, alias="W_dec")
    d_out = state["w_dec"].shape[1]
    W_enc = require(state, "w_enc", (d_in, d_sae), where, alias="W_enc")
    W_dec = require(state, "w_dec", (d_sae, d_out), where, alias="W_dec")
    b_enc = require(state, "b_enc", (d_sae,), where)
    b_dec = require(state, "b_dec", (d_out,), where)
    if "threshold" not in state:
        raise UserError(f"{where}: JumpReLU dictionary without a 'threshold' tensor "
                        f"(found: {', '.join(sorted(raw))})")
    layer, site, transcoder = _site_from_path(folder)
    hf_in, hf_out = _hf_hook(cfg.get("hf_hook_point_in")), _hf_hook(cfg.get("hf_hook_point_out"))
    transcoder = transcoder or bool(hf_out) or d_out != d_in
    w = Weights("jumprelu_transcoder" if transcoder else "jumprelu", W_enc, b_enc, W_dec, b_dec,
                activation="jumprelu", threshold=require(state, "threshold", (d_sae,), where),
                meta={"gemma_scope_version": 1 if v1 else 2})
    if "affine_skip_connection" in state:
        w.W_skip = require(state, "affine_skip_connection", (d_in, d_out), where).T
        w.architecture = "jumprelu_skip_transcoder"
    hook_in = hook or hf_in or (f"blocks.{layer}.{site}" if layer is not None and site else None)
    hook_out = hf_out or (f"blocks.{layer}.hook_mlp_out" if transcoder and layer is not None else None)
    if not transcoder:
        hook_out = hook_in
    model = cfg.get("model_name") or _model_name(folder)
    return Dictionary(w, hook_in=hook_in, hook_out=hook_out, source_format=f"gemmascope_v{1 if v1 else 2}",
                      source=source, sha256=sha256_file(path), model_name=model, where=where)
