"""The dictionary a feature set reads, checked against the subject, and how its features reach the logits.

`features.sae` is one of
  * a bare name: this project's `run_dir/sae/<name>/` (`autoencoder.sae.load_sae`, the fast path of
    standard SAEs kept), the feature set named after it;
  * a path (anything with a `/`) or a hub id `hf:ORG/REPO[/SUBPATH]`: any format
    `autoencoder.load_dictionary` reads (SAELens, sparsify, Gemma Scope, dictionary_learning, ours),
    the feature set named after the folder (`external_name`).

The scanned hook point is the dictionary's `hook_in`; `features.sae_hook` supplies it where the
files record none (or replaces the one they record). Checked before anything is written: the hook
exists in the subject, the dictionary's width matches the hook's, and its recorded model name
matches the subject's (a mismatch only warns: fine-tunes are common).

Logit effects follow each feature's output direction from the dictionary's output side (`hook_out`):
a residual-stream or MLP-output direction goes through the final norm's scale and the unembedding; a
direction in the MLP's neuron basis (`mlp.hook_post`) goes through the MLP's output weights first.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tools.core.config import UserError

HUB_PREFIX = "hf:"
# weights file of each `Dictionary.source_format`, and the config file beside it (when there is one)
WEIGHTS = {"ours": "sae_weights.safetensors", "saelens": "sae_weights.safetensors",
           "sparsify": "sae.safetensors", "gemmascope_v1": "params.npz",
           "gemmascope_v2": "params.safetensors", "dictionary_learning": "ae.pt"}
CONFIGS = ("cfg.json", "config.json")
LOGIT_PATHS = {
    "neurons": "direct path: output direction @ c_proj, * ln_f scale, @ W_U "
               "(ignores LayerNorm centering/normalisation and later layers)",
    "residual": "direct path: output direction (residual stream or MLP output) * final norm scale, @ W_U "
                "(ignores the norm's centering/normalisation and later layers)",
}


def is_external(sae: str | None) -> bool:
    """Whether `features.sae` names a path or a hub id rather than a folder under `run_dir/sae/`."""
    return sae is not None and (sae.startswith(HUB_PREFIX) or "/" in sae or "\\" in sae)


def external_name(sae: str) -> str:
    """The unit-set name of a path or hub id: the folder's name (`hf:ORG/REPO/a/b` -> `REPO--a--b`)."""
    text = sae.strip()
    if text.startswith(HUB_PREFIX):
        parts = [p for p in text[len(HUB_PREFIX):].split("/") if p][1:]
    else:
        path = Path(text).expanduser()
        if path.is_file():
            path = path.parent
        parts = [path.resolve().name if path.name in ("", ".", "..") else path.name]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "--".join(parts)).strip("._-")
    if not name:
        raise UserError(f"features.sae={sae!r}: cannot name a feature set after it; pass a folder or hf: id")
    return name


@dataclass
class Opened:
    """A dictionary opened for the features stage: the module, its hook points and what meta.json records."""

    sae: Any  # autoencoder.sae.SAE (our folders by name) or autoencoder.dictionaries.Dictionary
    hook_in: str
    hook_out: str
    n_units: int
    files: dict[str, str]  # input files -> path (the stage hashes and seals them)
    record: dict[str, Any] = field(default_factory=dict)  # meta.json `dictionary`
    metrics: dict[str, Any] | None = None  # our SAE's training metrics (cfg.json), else None

    @property
    def layer(self) -> int:
        from transformer.subject import parse_hook

        return parse_hook(self.hook_in)[0]

    @property
    def logit_path(self) -> str:
        """"neurons" (output in the MLP's neuron basis: through W_out first) or "residual"."""
        from transformer.subject import hook_kind

        return "neurons" if hook_kind(self.hook_out) == "neurons" else "residual"


def open_dictionary(cfg: Any, fc: Any, name: str, model: Any, device: str) -> Opened:
    """The dictionary `features.sae` names, on `device`, checked against the subject `model`."""
    from autoencoder.dictionaries.base import check_hook

    hook = check_hook(fc.sae_hook, "features.sae_hook")
    if is_external(fc.sae):
        opened = _open_external(fc.sae, hook, device)
    else:
        opened = _open_ours(cfg, name, hook, device)
    _check(opened, model)
    return opened


def _open_ours(cfg: Any, name: str, hook: str | None, device: str) -> Opened:
    from autoencoder.sae import load_sae
    from tools.core.files import read_json, sha256_file
    from tools.core.layout import RunLayout

    sae_dir = RunLayout.of(cfg).sae(name)
    sae = load_sae(sae_dir, device)
    recorded_out = getattr(sae.cfg, "hook_name_out", None)
    hook_in = hook or sae.cfg.hook_name
    hook_out = recorded_out or hook_in
    weights = sae_dir / "sae_weights.safetensors"
    meta = read_json(sae_dir / "cfg.json", "SAE config")
    record = {"source": str(sae_dir), "format": "ours", "sha256": sha256_file(weights),
              "architecture": sae.cfg.architecture, "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae),
              "hook_in": hook_in, "hook_out": hook_out, "model_name": None}
    return Opened(sae, hook_in, hook_out, int(sae.cfg.d_sae), {"sae": str(weights)}, record,
                  meta.get("metrics"))


def _open_external(source: str, hook: str | None, device: str) -> Opened:
    from autoencoder.dictionaries import load_dictionary, resolve

    folder = resolve(source, hook)
    d = load_dictionary(folder, hook=hook, device=device)
    d.source = source
    if d.hook_in is None:
        raise UserError(f"features.sae={source!r}: the dictionary ({d.source_format}) records no hook point; "
                        f"set features.sae_hook=blocks.<layer>.<site> (e.g. blocks.0.hook_resid_post)")
    files = {"sae": str(folder / WEIGHTS[d.source_format])}
    config = next((folder / c for c in CONFIGS if (folder / c).is_file()), None)
    if config is not None:
        files["sae_config"] = str(config)
    hook_out = d.hook_out or d.hook_in
    record = {"source": source, "folder": str(folder), "format": d.source_format, "sha256": d.sha256,
              "architecture": d.architecture, "d_in": d.d_in, "d_sae": d.d_sae, "d_out": d.d_out,
              "hook_in": d.hook_in, "hook_out": hook_out, "model_name": d.model_name}
    return Opened(d, d.hook_in, hook_out, d.d_sae, files, record)


def _short(model_name: str) -> str:
    return model_name.rstrip("/").rsplit("/", 1)[-1].lower()


def _check(o: Opened, model: Any) -> None:
    """Hooks the subject has, widths that match them, the model name (a warning)."""
    src = o.record["source"]
    model.check_hooks([o.hook_in])
    d_in = int(o.record["d_in"])
    if d_in != model.width(o.hook_in):
        raise UserError(f"SAE {src} has d_in={d_in} but {model.name}'s {o.hook_in} has width "
                        f"{model.width(o.hook_in)}")
    if o.hook_out != o.hook_in:
        model.check_hooks([o.hook_out])
    d_out = int(o.record.get("d_out") or d_in)
    if d_out != model.width(o.hook_out):
        raise UserError(f"SAE {src} has d_out={d_out} but {model.name}'s {o.hook_out} has width "
                        f"{model.width(o.hook_out)}")
    recorded = o.record.get("model_name")
    if recorded and _short(str(recorded)) != _short(model.name):
        print(f"warning: dictionary {src} records model {recorded!r}, the subject is {model.name!r}; "
              "scanning it anyway (a fine-tune?)", file=sys.stderr, flush=True)


def output_directions(sae: Any) -> torch.Tensor | None:
    """[n_units, d_out]: each feature's output direction (None: neurons, the identity)."""
    if sae is None:
        return None
    from autoencoder.dictionaries.base import Dictionary

    return sae.decoder_directions() if isinstance(sae, Dictionary) else sae.W_dec


def some_units(sae: Any, x: torch.Tensor, units: torch.Tensor) -> torch.Tensor | None:
    """A `Dictionary`'s activation of one unit per window, one encoder column each ([E, L, d] -> [E, L]),
    for ReLU and JumpReLU dictionaries without input normalization; None where the full encode is needed."""
    from autoencoder.dictionaries.base import Dictionary

    if not isinstance(sae, Dictionary) or sae.activation not in ("relu", "jumprelu"):
        return None
    if sae.input_norm != "none":
        return None
    x = x.to(sae.W_enc.dtype)
    if sae.pre_bias is not None:
        x = x - sae.pre_bias
    pre = torch.einsum("eld,ed->el", x, sae.W_enc.t()[units]) + sae.b_enc[units][:, None]
    if sae.activation == "relu":
        return torch.relu(pre)
    return pre.masked_fill(pre <= sae.threshold[units].clamp(min=0)[:, None], 0)
