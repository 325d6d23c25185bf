"""EleutherAI sparsify folders: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`.

Follows `sparsify/sparse_coder.py` (v1.3): `encode` subtracts `b_dec` only when `transcode` is false,
then `relu(x @ encoder.weight.T + encoder.bias)` and keeps the top k (or, with `activation` "groupmax",
the max of each of k groups); `decode` is `f @ W_dec + b_dec`; `forward` adds `x @ W_skip.T` when
`skip_connection` is set. `W_dec` has the encoder's shape [num_latents, d_in], so d_out == d_in.

The folder name is the Hugging Face module path the coder was trained on, mapped to our hooks:
`[...]layers.N` / `h.N` -> `blocks.N.hook_resid_post`, `[...]layers.N.mlp` -> `blocks.N.hook_mlp_out`,
and for a transcoder on `layers.N.mlp` the input side is the MLP input after its norm,
`blocks.N.ln2.hook_normalized`. Other module paths keep `hook_in` None unless `hook=` is given.
"""

from __future__ import annotations

import re
from pathlib import Path

from autoencoder.dictionaries.base import Dictionary, Weights, read_safetensors, require
from tools.core.config import UserError
from tools.core.files import read_json, sha256_file

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
_LAYER = r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)"


def matches(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def hooks_for(hookpoint: str, transcode: bool) -> tuple[str | None, str | None]:
    """(hook_in, hook_out) for a sparsify hookpoint (an HF module path), or (None, None)."""
    m = re.match(_LAYER + r"$", hookpoint)
    if m:
        return f"blocks.{m.group(1)}.hook_resid_post", f"blocks.{m.group(1)}.hook_resid_post"
    m = re.match(_LAYER + r"\.mlp$", hookpoint)
    if m:
        out = f"blocks.{m.group(1)}.hook_mlp_out"
        return (f"blocks.{m.group(1)}.ln2.hook_normalized" if transcode else out), out
    return None, None


def load(folder: Path, hook: str | None, source: str) -> Dictionary:
    """Load one sparsify hookpoint folder (see the module docstring)."""
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json(cfg_path, "sparsify config")
    try:
        d_in = int(cfg["d_in"])
        d_sae = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
        k = int(cfg.get("k", 32))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: missing or bad field d_in/num_latents/expansion_factor/k ({e})") from e
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise UserError(f"{cfg_path}: activation {activation!r} is not supported (known: topk, groupmax)")
    transcode = bool(cfg.get("transcode", False))
    where = str(weights_path)
    state = read_safetensors(weights_path)
    W_enc = require(state, "encoder.weight", (d_sae, d_in), where).T
    b_enc = require(state, "encoder.bias", (d_sae,), where)
    W_dec = require(state, "W_dec", (d_sae, d_in), where)
    b_dec = require(state, "b_dec", (d_in,), where)
    arch = ("skip_transcoder" if cfg.get("skip_connection") else "transcoder") if transcode else activation
    w = Weights(arch, W_enc, b_enc, W_dec, b_dec, activation=activation, k=k,
                pre_bias=None if transcode else b_dec,
                meta={"hookpoint": folder.name, "transcode": transcode})
    if cfg.get("skip_connection"):
        w.W_skip = require(state, "W_skip", (d_in, d_in), where)
    hook_in, hook_out = hooks_for(folder.name, transcode)
    if hook:
        hook_in, hook_out = hook, (hook_out if transcode else hook)
    return Dictionary(w, hook_in=hook_in, hook_out=hook_out, source_format="sparsify", source=source,
                      sha256=sha256_file(weights_path), where=where)
