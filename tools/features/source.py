"""Everything this stage takes from the model, the SAE and the tokens, in one place.

The subject (`transformer.subject`: our GPT or a Hugging Face LM) is the stage's only access to the
model: "activations at these hook points for these token ids" (`capture`: a layer's MLP neurons, its
residual stream, ...) and the weights of the direct logit path (`neuron_out_weight`, `unembedding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from tools.core.config import UserError
from tools.core.layout import RunLayout
from tools.features.config import FeaturesConfig
from tools.features.dictionary import output_directions
from tools.features.dictionary import some_units as dictionary_units
from transformer.subject import parse_hook


@dataclass
class Inputs:
    model: Any  # a transformer.subject.Subject (a bare GPT is wrapped)
    sae: Any | None
    layer: int
    tokens: np.ndarray  # the split, memory-mapped
    T: int  # tokens per context
    n_ctx: int  # contexts scanned
    n_units: int
    files: dict[str, str]  # input files -> sha256 (for done())
    dictionary: Any = None  # tools.features.dictionary.Opened (SAE units): hooks, provenance, logit path

    def __post_init__(self) -> None:
        from transformer.subject import GPTSubject, Subject

        if not isinstance(self.model, Subject):
            self.model = GPTSubject(self.model)

    @property
    def hook(self) -> str:
        """The hook point scanned: the dictionary's input, or the MLP neurons of `layer` (the units)."""
        from transformer.subject import hook_point

        return self.dictionary.hook_in if self.dictionary is not None else hook_point("neurons", self.layer)


@dataclass
class Shared:
    """What every unit set of one subject shares: the model and the scanned tokens."""

    model: Any
    tokens: np.ndarray
    T: int
    n_ctx: int
    files: dict[str, str]  # the model's and the tokens' files


def load_shared(cfg: DictConfig, fc: FeaturesConfig, device: str, fingerprint: str | None = None) -> Shared:
    """The subject and the token split, checked against each other; `fingerprint`: the tokenizer's."""
    from transformer.data import open_tokens, token_dir
    from transformer.subject_load import load_subject, subject_config

    model = load_subject(cfg, device)
    files = {"model": str(_weights_file(cfg, subject_config(cfg)))}
    folder = token_dir(cfg)
    path = folder / f"{fc.split}.bin"
    if not path.is_file():
        raise UserError(f"features.split={fc.split!r}: token file {path} not found (run transformer.prepare)")
    tokens = open_tokens(folder, fc.split, fingerprint=fingerprint)
    files["tokens"] = str(path)
    T = fc.context_len or int(model.spec.extra.get("default_context") or model.max_context)
    if T > model.max_context:
        raise UserError(f"features.context_len={T} exceeds the model's context {model.max_context}")
    avail = len(tokens) // T
    if avail == 0:
        raise UserError(f"{path} holds {len(tokens)} tokens, fewer than one context of {T}")
    n_ctx = min(fc.contexts or avail, avail)
    if fc.contexts and fc.contexts > avail:
        print(f"features.contexts={fc.contexts} but {path} holds {avail} contexts of {T}: scanning {avail}")
    if int(tokens[: n_ctx * T].max()) >= model.vocab_size:
        raise UserError(f"{path} has token ids >= the model's vocab_size {model.vocab_size}")
    return Shared(model, tokens, T, n_ctx, files)


def unit_inputs(cfg: DictConfig, fc: FeaturesConfig, name: str, shared: Shared, device: str) -> Inputs:
    """One unit set over the shared subject and tokens: a layer's neurons, or a dictionary's features
    (ours, or any format `autoencoder.load_dictionary` opens: tools.features.dictionary)."""
    from tools.features.dictionary import open_dictionary

    model = shared.model
    files = dict(shared.files)
    sae = opened = None
    if fc.unit == "sae":
        opened = open_dictionary(cfg, fc, name, model, device)
        sae, layer, n_units = opened.sae, opened.layer, opened.n_units
        files.update(opened.files)
    else:
        layer = fc.layer
        n_units = model.d_mlp
    if not 0 <= layer < model.n_layers:
        raise UserError(f"features.layer={layer} out of range: {model.name} has {model.n_layers} layers "
                        f"(0..{model.n_layers - 1})")
    if fc.pages is not None:
        bad = [i for i in fc.pages if not 0 <= i < n_units]
        if bad:
            raise UserError(f"features.pages has indices out of range {bad[:5]} (units are 0..{n_units - 1})")
    return Inputs(model, sae, layer, shared.tokens, shared.T, shared.n_ctx, n_units, files, opened)


def load_inputs(cfg: DictConfig, fc: FeaturesConfig, name: str, device: str,
                fingerprint: str | None = None) -> Inputs:
    """Model, SAE and the token split, checked against each other; `fingerprint`: the tokenizer's."""
    return unit_inputs(cfg, fc, name, load_shared(cfg, fc, device, fingerprint), device)


def _weights_file(cfg: DictConfig, sc: Any) -> Path:
    """The file that pins the subject's weights for done(): our GPT's, or an HF model's first weights file."""
    if sc.kind == "gpt":
        return RunLayout.of(cfg).transformer / "model.safetensors"
    from transformer.hf_load import local_folder, weights_files

    folder = local_folder(sc, str(cfg.data_dir))
    files = weights_files(folder)
    if not files:
        raise UserError(f"{folder}: no *.safetensors or *.bin weights")
    return files[0]


class UnitActs:
    """Activations of the units from token ids: the forward pass the scan and the windows share."""

    def __init__(self, inp: Inputs, dtype: str):
        self.inp = inp
        self.autocast = dtype == "bfloat16"

    def mlp(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.inp.model.capture(idx, [self.inp.hook])[self.inp.hook].float()

    @torch.no_grad()
    def all_units(self, idx: torch.Tensor) -> torch.Tensor:
        return self.encode(self.mlp(idx))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The units from the hook point's value x [B, T, width] (the SAE's encoder, or x itself)."""
        x = x.float()
        if self.inp.sae is None:
            return x
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.inp.sae.encode(x).float()

    @torch.no_grad()
    def some_units(self, x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """x [E, L, d_mlp] windows, units [E] -> each window's activation of its own unit [E, L]."""
        sae = self.inp.sae
        if sae is None:
            return x.gather(2, units[:, None, None].expand(-1, x.shape[1], 1)).squeeze(2)
        fast = dictionary_units(sae, x, units)  # ReLU / JumpReLU dictionaries of any format
        if fast is not None:
            return fast
        # our standard SAE or transcoder: ReLU(sae_in(x) W_enc + b_enc), one column each
        if getattr(getattr(sae, "cfg", None), "architecture", None) == "standard":
            w = sae.W_enc.t()[units]  # [E, d]
            pre = torch.einsum("eld,ed->el", sae.sae_in(x), w) + sae.b_enc[units][:, None]
            return torch.relu(pre)
        out = []
        for i in range(0, x.shape[0], 64):  # other architectures (e.g. top-k) need the full encode
            f = sae.encode(x[i:i + 64])
            out.append(f.gather(2, units[i:i + 64, None, None].expand(-1, f.shape[1], 1)).squeeze(2))
        return torch.cat(out)


@torch.no_grad()
def logit_effects(inp: Inputs, k: int, vocab: int, chunk: int = 512) -> tuple[np.ndarray, ...]:
    """Top-k positive and negative direct logit effects per unit: (pos_ids, pos_vals, neg_ids, neg_vals).

    A negative activation's effect is the negation, so a signed unit's negative side promotes the
    `neg` tokens and suppresses the `pos` ones.
    """
    through_mlp = inp.dictionary is None or inp.dictionary.logit_path == "neurons"
    out_layer = inp.layer if inp.dictionary is None else parse_hook(inp.dictionary.hook_out)[0]
    W_out = inp.model.neuron_out_weight(out_layer).float() if through_mlp else None  # [d_model, d_mlp]
    W_U = inp.model.unembedding()[:vocab].float()  # final norm folded in; padding ids excluded
    dirs = output_directions(inp.sae)  # [n_units, d_out]; None: neurons
    k = min(k, vocab)
    res = ([], [], [], [])
    for i in range(0, inp.n_units, chunk):
        j = min(i + chunk, inp.n_units)
        if dirs is not None:
            d = dirs[i:j].float()  # [c, d_out]
        else:
            d = torch.eye(W_out.shape[1], device=W_out.device)[i:j]
        logits = ((d @ W_out.t()) if through_mlp else d) @ W_U.t()  # [c, vocab]
        pv, pi = logits.topk(k, dim=1)
        nv, ni = logits.topk(k, dim=1, largest=False)
        for lst, t in zip(res, (pi, pv, ni, nv), strict=True):
            lst.append(t.cpu().numpy())
    return tuple(np.concatenate(r) for r in res)


@torch.no_grad()
def capture_sets(inps: list[Inputs], idx: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """Every hook point the unit sets read, from one forward that stops after the last one."""
    hooks = sorted({inp.hook for inp in inps})
    with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        return inps[0].model.capture(idx, hooks)
