"""`Dictionary`: one inference module for every sparse dictionary format, plus the checks the loaders share.

Encoding, in the order the source libraries apply it:

    x' = norm_in(x) - pre_bias                       (pre_bias: b_dec where the library subtracts it)
    pre = x' @ W_enc + b_enc
    f = act(pre)

with `act` one of: relu; topk (keep the k largest pre-activations, then ReLU; optionally on
`pre * ||W_dec||`, SAELens' `rescale_acts_by_decoder_norm`); jumprelu (`relu(pre) * (pre > θ)`, the
Gemma Scope / SAELens form, which also covers dictionary_learning's BatchTopK threshold since
`relu(pre) > θ` and `pre > θ` select the same nonzero values); gated (Rajamanoharan et al. 2024:
`1[x' W_enc + b_gate > 0] * relu(x' (W_enc * exp(r_mag)) + b_mag)`); groupmax (sparsify: the max of
each of k equal groups). Decoding is `(f * feature_scale) @ W_dec + b_dec` (rescaled back by the
decoder norms for SAELens' rescaled TopK) then `norm_out`; `forward` adds `x @ W_skip.T` for skip
transcoders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from tools.core.config import UserError

ACTIVATIONS = ("relu", "topk", "jumprelu", "gated", "groupmax")
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")
HOOK_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "mlp.hook_post",
              "ln2.hook_normalized")
HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in HOOK_SITES) + r")$")


def check_hook(name: str | None, where: str) -> str | None:
    """Return `name` if it is a hook point this project captures (TransformerLens-style), else raise."""
    if name is None or HOOK_RE.match(name):
        return name
    raise UserError(f"{where}: unknown hook {name!r}; expected blocks.<layer>.<site> with site one of "
                    f"{', '.join(HOOK_SITES)}")


def require(tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str,
            alias: str | None = None) -> torch.Tensor:
    """`tensors[name]` as float32, raising one line if it is missing or its shape differs from `shape`."""
    label = alias or name
    if name not in tensors:
        raise UserError(f"{where}: required tensor {label!r} missing (found: {', '.join(sorted(tensors))})")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{where}: tensor {label!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.detach().to(torch.float32)


@dataclass
class Weights:
    """What a format loader extracts; `Dictionary` checks it and turns it into buffers."""

    architecture: str
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_out]
    b_dec: torch.Tensor  # [d_out]
    activation: str = "relu"
    k: int | None = None
    threshold: torch.Tensor | None = None  # [d_sae]
    pre_bias: torch.Tensor | None = None  # [d_in], subtracted before encoding
    W_skip: torch.Tensor | None = None  # [d_out, d_in]
    b_gate: torch.Tensor | None = None
    r_mag: torch.Tensor | None = None
    b_mag: torch.Tensor | None = None
    feature_scale: torch.Tensor | None = None  # [d_sae], multiplies codes before decoding
    rescale_by_decoder_norm: bool = False
    input_norm: str = "none"
    meta: dict[str, Any] = field(default_factory=dict)


class Dictionary(nn.Module):
    """A loaded sparse dictionary: `encode` [N, d_in] -> dense codes [N, d_sae], `decode` -> [N, d_out].

    Attributes: `architecture`, `d_in`, `d_sae`, `d_out`, `k`, `hook_in`, `hook_out`, `source_format`,
    `source`, `sha256` (of the weights file), `model_name` (None where the format records none),
    `meta` (format-specific extras).
    """

    def __init__(self, w: Weights, *, hook_in: str | None, hook_out: str | None, source_format: str,
                 source: str, sha256: str, model_name: str | None = None, where: str | None = None):
        super().__init__()
        where = where or source
        if w.activation not in ACTIVATIONS:
            raise UserError(f"{where}: unsupported activation {w.activation!r} "
                            f"(known: {', '.join(ACTIVATIONS)})")
        if w.input_norm not in INPUT_NORMS:
            raise UserError(f"{where}: unsupported input normalization {w.input_norm!r} "
                            f"(known: {', '.join(INPUT_NORMS)})")
        d_in, d_sae = w.W_enc.shape
        d_out = w.W_dec.shape[1]
        expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,),
                    "threshold": (d_sae,), "pre_bias": (d_in,), "W_skip": (d_out, d_in), "b_gate": (d_sae,),
                    "r_mag": (d_sae,), "b_mag": (d_sae,), "feature_scale": (d_sae,)}
        for name, shape in expected.items():
            t = getattr(w, name)
            if t is None:
                self.register_buffer(name, None)
                continue
            t = require({name: t}, name, shape, where)
            if not torch.isfinite(t).all():
                raise UserError(f"{where}: tensor {name!r} holds NaN or inf values")
            self.register_buffer(name, t.contiguous())
        if w.activation == "jumprelu" and w.threshold is None:
            raise UserError(f"{where}: JumpReLU dictionary without a 'threshold' tensor")
        if w.activation == "gated" and (w.b_gate is None or w.r_mag is None or w.b_mag is None):
            raise UserError(f"{where}: gated dictionary needs 'b_gate', 'r_mag' and 'b_mag'")
        if w.activation in ("topk", "groupmax") and not (w.k and 0 < w.k <= d_sae):
            raise UserError(f"{where}: {w.activation} needs k in 1..{d_sae}, got {w.k!r}")
        if w.activation == "groupmax" and d_sae % w.k:
            raise UserError(f"{where}: groupmax needs d_sae ({d_sae}) divisible by k ({w.k})")
        if w.input_norm != "none" and d_out != d_in:
            raise UserError(f"{where}: input normalization {w.input_norm!r} needs d_out == d_in")
        self.architecture, self.activation, self.k = w.architecture, w.activation, w.k
        self.rescale_by_decoder_norm, self.input_norm = w.rescale_by_decoder_norm, w.input_norm
        self.d_in, self.d_sae, self.d_out = int(d_in), int(d_sae), int(d_out)
        self.hook_in = check_hook(hook_in, where)
        self.hook_out = check_hook(hook_out, where)
        self.source_format, self.source, self.sha256 = source_format, source, sha256
        self.model_name, self.meta = model_name, dict(w.meta)
        self._norm_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        dec_norm = self.W_dec.norm(dim=-1) if w.rescale_by_decoder_norm else None
        self.register_buffer("dec_norm", dec_norm, persistent=False)

    def _norm_in(self, x: torch.Tensor) -> torch.Tensor:
        """SAELens' run-time input normalization; its statistics are kept for the next `decode`."""
        if self.input_norm == "constant_norm_rescale":
            coeff = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            self._norm_stats = (coeff, torch.zeros_like(coeff))
            return x * coeff
        if self.input_norm == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            self._norm_stats = (1.0 / std, mu)
            return x / (std + 1e-5)
        return x

    def _norm_out(self, y: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "none" or self._norm_stats is None:
            return y
        scale, mu = self._norm_stats
        self._norm_stats = None
        return y / scale + mu

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, d_sae] for inputs [N, d_in], as the source library computes them."""
        x = self._norm_in(x.to(self.W_enc.dtype))
        if self.pre_bias is not None:
            x = x - self.pre_bias
        if self.activation == "gated":  # x (W_enc * exp(r_mag)) = (x W_enc) * exp(r_mag): one GEMM
            h = x @ self.W_enc
            return torch.relu(h * self.r_mag.exp() + self.b_mag).masked_fill_(h + self.b_gate <= 0, 0)
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":  # relu(pre) * 1[pre > θ] == pre * 1[pre > max(θ, 0)]
            return pre.masked_fill_(pre <= self.threshold.clamp(min=0), 0)
        if self.activation == "groupmax":
            values, idx = torch.relu(pre).unflatten(-1, (self.k, -1)).max(dim=-1)
            idx = idx + torch.arange(0, self.d_sae, self.d_sae // self.k, device=pre.device)
            return torch.zeros_like(pre).scatter_(-1, idx, values)
        if self.rescale_by_decoder_norm:
            pre = pre * self.dec_norm
        values, idx = torch.topk(pre, self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, values.relu())

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, d_out] from codes [N, d_sae] (without the skip term; see `forward`)."""
        f = f.to(self.W_dec.dtype)
        if self.feature_scale is not None:
            f = f * self.feature_scale
        if self.rescale_by_decoder_norm:
            f = f / self.dec_norm
        return self._norm_out(f @ self.W_dec + self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)), plus `x @ W_skip.T` for skip transcoders."""
        y = self.decode(self.encode(x))
        if self.W_skip is not None:
            y = y + x.to(self.W_skip.dtype) @ self.W_skip.T
        return y

    def decoder_directions(self) -> torch.Tensor:
        """[d_sae, d_out]: what one unit of each code adds to the output (for logit effects)."""
        d = self.W_dec
        if self.rescale_by_decoder_norm:
            d = d / d.norm(dim=-1, keepdim=True)
        if self.feature_scale is not None:
            d = d * self.feature_scale[:, None]
        return d

    def extra_repr(self) -> str:
        return (f"architecture={self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"d_out={self.d_out}, "
                f"hook_in={self.hook_in}, hook_out={self.hook_out}, format={self.source_format}")


def read_safetensors(path: Any) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, a missing or unreadable file as one UserError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path}: cannot read safetensors file ({str(e).splitlines()[0]})") from e
