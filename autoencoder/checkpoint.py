"""SAE trainer resume state: weights, per-feature Adam state, firing record and RNG as safetensors,
plus `state.json` (step, config, readers, resampling history). A checkpoint is complete only once
`state.json` names the step written in the tensors' metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autoencoder.saes import SAE
from tools.core import guard
from tools.core.config import UserError
from tools.core.files import atomic_path, read_json, sha256_file, write_json

CKPT_FORMAT = "monosemantic.sae-checkpoint/2"
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def save_checkpoint(ckpt: Path, *, sae: SAE, optimizer: torch.optim.Optimizer, step: int,
                    tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write the parameters, the optimizer state, the extra `tensors` (firing record, ...) and
    the RNG, then `state.json` = {format, step, **state}."""
    from safetensors.torch import save_file

    out = dict(tensors)
    for n in sae.state_names():
        p = getattr(sae, n)
        out[f"sae.{n}"] = p.detach()
        st = optimizer.state.get(p, {})
        for key in ADAM_KEYS:
            if key in st:
                out[f"adam.{n}.{key}"] = st[key]
    out["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and sae.W_dec.is_cuda:
        out["rng.cuda"] = torch.cuda.get_rng_state()
    out = {k: v.detach().cpu().contiguous() for k, v in out.items()}
    with atomic_path(ckpt / "state.safetensors") as tmp:
        save_file(out, str(tmp), metadata={"step": str(step), "format": CKPT_FORMAT})
    write_json(ckpt / "state.json", {"format": CKPT_FORMAT, "step": step,  # sha256: checked at resume
                                     "tensors_sha256": sha256_file(ckpt / "state.safetensors"), **state})


def load_checkpoint(ckpt: Path, *, sae: SAE, optimizer: torch.optim.Optimizer,
                    expect: dict[str, Any]) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Restore weights, optimizer state and RNG; returns (step, the other tensors on the SAE's
    device, state.json). A checkpoint written under another config is an error naming the keys
    that differ."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = read_json(ckpt / "state.json", "SAE checkpoint")
    guard.verify_file(ckpt / "state.safetensors", meta.get("tensors_sha256"), "SAE checkpoint",
                      f"delete {ckpt} to train from the start")
    if meta.get("format") != CKPT_FORMAT:
        raise UserError(f"{ckpt / 'state.json'}: format {meta.get('format')!r}, expected {CKPT_FORMAT}; "
                        f"delete {ckpt} to start over")
    theirs = meta.get("config", {})
    diff = sorted(k for k in set(theirs) | set(expect) if theirs.get(k) != expect.get(k))
    if diff:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {expect.get(k)!r}" for k in diff[:6])
        raise UserError(f"checkpoint {ckpt} was written under another config ({shown}); "
                        f"use another sae.name or delete {ckpt} to start over")
    path = ckpt / "state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("step") != str(meta["step"]):
            raise UserError(f"{path} does not match {ckpt / 'state.json'} (interrupted write?)")
    t = load_file(str(path))
    dev = sae.W_dec.device
    with torch.no_grad():
        for n in sae.state_names():
            p = getattr(sae, n)
            p.copy_(t.pop(f"sae.{n}"))
            if f"adam.{n}.step" in t:
                optimizer.state[p] = {k: t.pop(f"adam.{n}.{k}").to(dev) for k in ADAM_KEYS}
    torch.set_rng_state(t.pop("rng.cpu"))
    cuda_rng = t.pop("rng.cuda", None)
    if cuda_rng is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng)
    return int(meta["step"]), {k: v.to(dev) for k, v in t.items()}, meta


def last_good(ckpt: Path) -> str:
    """'<path> (step N)' of the newest complete checkpoint, for error messages."""
    p = ckpt / "state.json"
    return f"{p} (step {read_json(p)['step']})" if p.is_file() else "none (no checkpoint yet)"


def remove_checkpoint(ckpt: Path) -> None:
    """The final artifacts supersede the checkpoint (a rerun then sees a finished SAE)."""
    for p in ("state.json", "state.safetensors"):
        (ckpt / p).unlink(missing_ok=True)
    try:
        ckpt.rmdir()
    except OSError:
        pass
