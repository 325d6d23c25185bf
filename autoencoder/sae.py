"""The SAE API: build, save and load an SAE of any registered architecture.

The architectures live in `autoencoder.saes` (one module each: L1 "standard", TopK, BatchTopK,
JumpReLU, Matryoshka; any of them as a transcoder). Their parameters have SAELens names and shapes,
and `save_sae` writes a folder that `sae_lens` loads with `SAE.load_from_disk` and encodes the same
way (`saelens_cfg`): BatchTopK and Matryoshka export as JumpReLU with their inference threshold, as
SAELens saves them. `load_sae` reads our folders (and SAELens standard/topk/jumprelu ones) back.

Loss reductions are per row: the squared error is summed over d_in (`mse_reduction="sum"`, as in
the papers' ‖x − x̂‖²) or averaged (`"mean"`), then everything is averaged over the batch, so a
sparsity coefficient means the same thing at every batch size (and under DDP).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from autoencoder.saes import SAE, SAEModelConfig, build_sae
from tools.core.config import UserError

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"
FORMAT = "monosemantic.sae/1"


# ---- files -----------------------------------------------------------------------------------
def saelens_architecture(sae: SAE) -> str:
    """The SAELens architecture of the export: the class's, or its transcoder variant (SAELens has
    (jumprelu_)(skip_)transcoder; a TopK transcoder has none and exports as `topk_transcoder`, which
    only our loaders read)."""
    base = type(sae).saelens
    if not sae.transcoder:
        return base
    prefix = {"standard": "", "jumprelu": "jumprelu_"}.get(base)
    if prefix is None:
        return f"{base}_transcoder"
    return f"{prefix}{'skip_' if sae.cfg.skip else ''}transcoder"


def saelens_cfg(sae: SAE, device: str = "cpu") -> dict[str, Any]:
    """cfg.json fields SAELens reads.

    Checked against decoderesearch/SAELens v6 (`SAE.load_from_disk` -> `handle_config_defaulting`:
    with no `sae_lens_version` the file is read as a pre-6.0 config, so top-level `hook_name`,
    `model_name`, ... move into `metadata` and unknown keys such as our `training` are dropped) and
    the v5 `SAEConfig.from_dict` fields (`hook_layer`, `activation_fn_str`, `context_size`, ...).
    """
    cfg = sae.cfg
    layer = cfg.hook_name.split(".")[1] if cfg.hook_name.startswith("blocks.") else "0"
    out: dict[str, Any] = {
        "architecture": saelens_architecture(sae),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": device,
        "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "finetuning_scaling_factor": False,
        # v5 and v6 metadata (what the SAE was trained on)
        "model_name": "monosemantic-gpt",
        "hook_name": cfg.hook_name,
        "hook_layer": int(layer) if layer.isdigit() else 0,
        "hook_head_index": None,
        "context_size": None,
        "prepend_bos": False,
        "dataset_path": None,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        **sae.export_cfg(),
    }
    if sae.transcoder:
        out["d_out"] = cfg.out_dim
        out["hook_name_out"] = cfg.hook_name_out
    return out


def state_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The exported tensors (SAELens names) of `sae` (or of a compiled one)."""
    return getattr(sae, "_orig_mod", sae).export_tensors()


def save_sae(sae: SAE, directory: str | Path, extra: dict[str, Any] | None = None,
             sparsity_log10: torch.Tensor | None = None) -> Path:
    """Write `sae_weights.safetensors` + `cfg.json` (SAELens fields + `format` + `extra`, e.g.
    `training` and `metrics`) and optionally `sparsity.safetensors`, each atomically."""
    from safetensors.torch import save_file

    from tools.core.files import atomic_path, write_json

    directory = Path(directory)
    tensors = state_tensors(sae)
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise UserError(f"refusing to save SAE to {directory}: {name} has NaN/Inf values")
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    if sparsity_log10 is not None:
        with atomic_path(directory / SPARSITY_FILE) as tmp:
            save_file({"sparsity": sparsity_log10.detach().float().cpu().contiguous()}, str(tmp))
    base = getattr(sae, "_orig_mod", sae)
    cfg = {"format": FORMAT, **saelens_cfg(base), "model": asdict(base.cfg), **(extra or {})}
    write_json(directory / CFG_FILE, cfg)
    return directory


def load_sae(directory: str | Path, device: str | torch.device = "cpu", kernel: str = "dense") -> SAE:
    """Load an SAE folder written by `save_sae` (or a SAELens standard/topk/jumprelu export)."""
    from safetensors.torch import load_file

    from tools.core.files import read_json

    directory = Path(directory)
    meta = read_json(directory / CFG_FILE, "SAE config")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"SAE weights not found: {weights} (run autoencoder.train first)")
    try:
        ours = meta.get("model") if meta.get("format") == FORMAT else None
        if ours:  # our architecture and extras; the SAELens fields say the shapes
            shapes = {"d_in": int(meta["d_in"]), "d_sae": int(meta["d_sae"])}
            if "d_out" in meta:
                shapes["d_out"] = int(meta["d_out"])
            cfg = SAEModelConfig(**{**ours, **shapes})
        else:
            hook = meta.get("hook_name") or (meta.get("metadata") or {}).get("hook_name")
            cfg = SAEModelConfig(architecture=meta["architecture"], d_in=int(meta["d_in"]),
                                 d_sae=int(meta["d_sae"]), k=meta.get("k"),
                                 hook_name=hook or "blocks.0.mlp.hook_post",
                                 dtype=meta.get("dtype", "float32"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{directory / CFG_FILE}: missing or bad SAE field ({e})") from e
    sae = build_sae(cfg, kernel=kernel)
    state = load_file(str(weights))
    for name, shape in sae.expected_shapes().items():
        if name not in state:
            raise UserError(f"{weights}: missing tensor {name!r}")
        if tuple(state[name].shape) != shape:
            raise UserError(f"{weights}: {name} has shape {tuple(state[name].shape)}, cfg.json says {shape}")
    sae.load_tensors(state)
    return sae.to(device).eval()


def load_sparsity(directory: str | Path) -> torch.Tensor:
    """log10 feature density [d_sae] written beside the weights."""
    from safetensors.torch import load_file

    path = Path(directory) / SPARSITY_FILE
    if not path.is_file():
        raise UserError(f"SAE sparsity not found: {path}")
    return load_file(str(path))["sparsity"]
