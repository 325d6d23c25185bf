"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (v6 and pre-6.0 configs).

Follows `sae_lens/saes/*.py` (v6.54) and `sae_lens/loading/pretrained_sae_loaders.py`:
- a config without `sae_lens_version` >= 6 is read as pre-6.0 (`handle_pre_6_0_config`):
  `hook_point` -> `hook_name`, `activation_fn_str` -> `activation_fn`, `activation_fn_kwargs.k` with
  topk makes the architecture "topk", a boolean `normalize_activations` True means
  "expected_average_only_in";
- `process_sae_in`: x -> norm_in(x) - b_dec * apply_b_dec_to_input (transcoders never subtract);
  `normalize_activations` "layer_norm" and "constant_norm_rescale" run at inference,
  "expected_average_only_in" does not (SAELens folds the factor into the weights,
  `fold_activation_norm_scaling_factor`: W_enc *= s, W_dec /= s, b_dec /= s); a training checkpoint's
  `activation_scaler.json` factor is folded the same way;
- a stored `scaling_factor` that is all ones is dropped (`read_sae_components_from_disk`); any other
  multiplies the codes before decoding, as pre-6.0 `apply_finetuning_scaling_factor` did;
- JumpReLU: `relu(pre) * (pre > threshold)`, `log_threshold` -> `exp` (`process_state_dict_for_loading`);
  BatchTopK SAEs are saved as JumpReLU; TopK with `rescale_acts_by_decoder_norm`;
  gated (`b_gate`, `r_mag`, `b_mag`); (jumprelu_)(skip_)transcoder with `d_out`, `W_skip` [d_out, d_in].
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from autoencoder.dictionaries.base import Dictionary, Weights, read_safetensors, require
from tools.core.config import UserError
from tools.core.files import read_json, sha256_file

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder",
                 "jumprelu_transcoder", "jumprelu_skip_transcoder")
NORMS = {"none": "none", "expected_average_only_in": "none", "layer_norm": "layer_norm",
         "constant_norm_rescale": "constant_norm_rescale"}


def matches(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _version(cfg: dict[str, Any]) -> tuple[int, ...]:
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version") or ""
    return tuple(int(p) for p in re.findall(r"\d+", str(v))[:3])


def normalized_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """A v6-shaped config: pre-6.0 keys renamed and defaulted as SAELens' `handle_pre_6_0_config` does."""
    meta = dict(cfg.get("metadata") or {})
    if _version(cfg) >= (6,):
        return {**cfg, "metadata": meta}
    renames = {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}
    out = {renames.get(k, k): v for k, v in cfg.items()}
    out.setdefault("apply_b_dec_to_input", True)
    out.setdefault("architecture", "standard")
    kwargs = out.get("activation_fn_kwargs") or {}
    if out.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        out["architecture"], out["k"] = "topk", kwargs["k"]
    norm = out.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        out["normalize_activations"] = "expected_average_only_in" if norm else "none"
    for key in ("hook_name", "hook_name_out", "model_name"):
        if key in out and key not in meta:
            meta[key] = out[key]
    out["metadata"] = meta
    return out


def _hook(name: Any) -> str | None:
    """SAELens hook names are TransformerLens names; `hook_mlp_in` is TL's pre-norm MLP input."""
    if not name:
        return None
    m = re.match(r"^blocks\.(\d+)\.hook_mlp_in$", str(name))
    return f"blocks.{m.group(1)}.hook_resid_mid" if m else str(name)


def load(folder: Path, hook: str | None, source: str) -> Dictionary:
    """Load a SAELens folder (see the module docstring for the semantics)."""
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    raw = read_json(cfg_path, "SAELens config")
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    cfg = normalized_cfg(raw)
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{cfg_path}: architecture {arch!r} is not supported "
                        f"(known: {', '.join(ARCHITECTURES)})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMS:
        raise UserError(f"{cfg_path}: normalize_activations {norm!r} is not supported "
                        f"(known: {', '.join(NORMS)})")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        transcoder = "transcoder" in arch
        d_out = int(cfg.get("d_out", d_in)) if transcoder else d_in
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: missing or bad field d_in/d_sae/d_out ({e})") from e
    where = str(weights_path)
    state = read_safetensors(weights_path)
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = torch.exp(state.pop("log_threshold"))
    W_enc = require(state, "W_enc", (d_in, d_sae), where)
    W_dec = require(state, "W_dec", (d_sae, d_out), where)
    b_dec = require(state, "b_dec", (d_out,), where)
    w = Weights(arch, W_enc, torch.zeros(d_sae), W_dec, b_dec)
    if arch == "gated":
        w.activation = "gated"
        w.b_gate, w.r_mag, w.b_mag = (require(state, n, (d_sae,), where)
                                      for n in ("b_gate", "r_mag", "b_mag"))
    else:
        w.b_enc = require(state, "b_enc", (d_sae,), where)
    if arch == "topk":
        w.activation, w.k = "topk", cfg.get("k")
        w.rescale_by_decoder_norm = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if arch.startswith("jumprelu"):
        w.activation = "jumprelu"
        if "threshold" not in state:
            raise UserError(f"{where}: JumpReLU dictionary without a 'threshold' tensor "
                            f"(found: {', '.join(sorted(state))})")
        w.threshold = require(state, "threshold", (d_sae,), where)
    if "skip" in arch:
        w.W_skip = require(state, "W_skip", (d_out, d_in), where)
    if bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder:
        w.pre_bias = b_dec
    w.input_norm = NORMS[norm]
    if "scaling_factor" in state:
        s = require(state, "scaling_factor", (d_sae,), where)
        if not torch.allclose(s, torch.ones_like(s)):
            w.feature_scale = s
    _fold_scaler(folder, w)
    meta = cfg["metadata"]
    hook_in = hook or _hook(meta.get("hook_name"))
    hook_out = _hook(meta.get("hook_name_out")) if transcoder else hook_in
    w.meta = {"apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
              "normalize_activations": norm, "sae_lens_version": ".".join(map(str, _version(raw))) or None}
    return Dictionary(w, hook_in=hook_in, hook_out=hook_out or hook_in, source_format="saelens",
                      source=source, sha256=sha256_file(weights_path), model_name=meta.get("model_name"),
                      where=where)


def _fold_scaler(folder: Path, w: Weights) -> None:
    """Fold a training checkpoint's activation-norm factor s as SAELens does at the end of training."""
    path = folder / SCALER_FILE
    if not path.is_file():
        return
    s = read_json(path, "SAELens activation scaler").get("scaling_factor")
    if s is None:
        return
    if not isinstance(s, (int, float)) or not s > 0:
        raise UserError(f"{path}: scaling_factor must be a positive number, got {s!r}")
    w.W_enc, w.W_dec, w.b_dec = w.W_enc * s, w.W_dec / s, w.b_dec / s
    if w.pre_bias is not None:
        w.pre_bias = w.b_dec
