"""The LM's resume state: `checkpoint/step_N.safetensors` (weights, Adam moments, RNG) + `state.json`.

`state.json` names the tensors file and its sha256 and records the model, data and batch identity a
resumed run must match; it is replaced atomically after the tensors are written, so a kill at any
point leaves one complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tools.core import guard
from tools.core.config import UserError
from tools.core.files import read_json, sha256_file, write_json
from tools.core.layout import RunLayout
from transformer.model import GPT

CKPT_FORMAT = "monosemantic.transformer-checkpoint/1"


def ckpt_dir(run_dir: Path) -> Path:
    """The LM checkpoint folder of a run."""
    return RunLayout(run_dir).transformer_checkpoint


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path: Path, step: int, model: GPT, opt: torch.optim.Optimizer, device: str,
                    info: dict[str, Any]) -> None:
    """`step_N.safetensors` (weights, Adam moments, RNG) then `state.json` pointing at it, atomically."""
    from safetensors.torch import save_file

    from tools.core.files import atomic_path

    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v.detach() if torch.is_tensor(v) else torch.tensor(v)
    tensors.update(_rng_state(device))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    name = f"step_{step:08d}.safetensors"
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / name) as tmp:
        save_file(tensors, str(tmp))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    write_json(path / "state.json", {"format": CKPT_FORMAT, "step": step, "tensors": name,
                                     "tensors_sha256": sha256_file(path / name),  # checked at resume
                                     "param_groups": groups, **info})
    for old in path.glob("step_*.safetensors"):  # only once state.json points at the new file
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path, model: GPT, opt: torch.optim.Optimizer, device: str,
                    expect: dict[str, Any]) -> dict[str, Any]:
    """Restore model, optimizer and RNG from `path`; refused (UserError) when `expect` differs."""
    from safetensors.torch import load_file

    state = read_json(path / "state.json", "checkpoint state")
    if state.get("format") != CKPT_FORMAT:
        raise UserError(f"{path / 'state.json'}: format {state.get('format')!r}, expected {CKPT_FORMAT!r}")
    for key in ("model", "data", "batch"):
        if state.get(key) != expect[key]:
            diff = {k: (state.get(key, {}).get(k), v) for k, v in expect[key].items()
                    if (state.get(key) or {}).get(k) != v}
            raise UserError(
                f"checkpoint {path} was written for a different {key} config "
                f"(key: (checkpoint, now) = {diff}); use another run_dir or transformer.resume=false")
    file = path / state["tensors"]
    if not file.is_file():
        raise UserError(f"checkpoint tensors {file} named by state.json are missing")
    guard.verify_file(file, state.get("tensors_sha256"), "transformer checkpoint",
                      f"delete {path} (or set transformer.resume=false) to train from the start")
    for old in path.glob("step_*.safetensors"):  # a kill between state.json and this cleanup leaves one
        if old.name != file.name:
            old.unlink(missing_ok=True)
    tensors = load_file(str(file), device="cpu")
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(msd, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise UserError(f"checkpoint {file} does not match the model: "
                        f"missing {missing}, unexpected {unexpected}")
    osd = opt.state_dict()
    ostate: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            ostate.setdefault(int(pid), {})[name] = v
    for g, saved in zip(osd["param_groups"], state["param_groups"], strict=True):
        g.update(saved)
    osd["state"] = ostate
    opt.load_state_dict(osd)
    torch.set_rng_state(tensors["rng.cpu"])
    if device.startswith("cuda") and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return state
