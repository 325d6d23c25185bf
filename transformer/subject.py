"""The subject: the model whose units later stages read, edit and describe, behind one interface.

Stages reach a model only through `Subject`: hook points named TransformerLens-style,
  * `blocks.{L}.mlp.hook_post`: the MLP neurons (the input of the MLP's output projection),
  * `blocks.{L}.hook_mlp_out`: the MLP's output,
  * `blocks.{L}.hook_resid_post`: the residual stream after block L,
`capture` (several hook points in one forward that stops after the last hooked layer), `logits` /
`loss` with hook points replaced (SAE splice-in, zero- or mean-ablation), and the weights of direct
logit effects. `GPTSubject` wraps our GPT (transformer/model.py, unchanged); `hf_subject.HFSubject`
wraps a Hugging Face causal LM. `load_subject(cfg, device)` picks one from the `subject` section.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tools.core.config import UserError

Edit = Callable[[torch.Tensor], torch.Tensor]
HOOK_KINDS = {"neurons": "mlp.hook_post", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
_ORDER = {suffix: i for i, suffix in enumerate(HOOK_KINDS.values())}  # order within a block
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in HOOK_KINDS.values()) + r")$")


def hook_point(kind: str, layer: int) -> str:
    """`hook_point("neurons", 3)` -> `blocks.3.mlp.hook_post`."""
    if kind not in HOOK_KINDS:
        raise UserError(f"unknown hook kind {kind!r}: expected one of {' | '.join(HOOK_KINDS)}")
    return f"blocks.{layer}.{HOOK_KINDS[kind]}"


def parse_hook(name: str) -> tuple[int, str]:
    """`blocks.3.mlp.hook_post` -> (3, "mlp.hook_post"); anything else is a UserError."""
    m = _HOOK_RE.match(name)
    if not m:
        raise UserError(f"hook point {name!r} is not blocks.<layer>.(" + "|".join(HOOK_KINDS.values()) + ")")
    return int(m.group(1)), m.group(2)


def hook_kind(name: str) -> str:
    suffix = parse_hook(name)[1]
    return next(k for k, s in HOOK_KINDS.items() if s == suffix)


def last_hook(hooks: Iterable[str]) -> str:
    """The hook point computed last in a forward pass (where a capture may stop)."""
    return max(hooks, key=lambda h: (parse_hook(h)[0], _ORDER[parse_hook(h)[1]]))


@dataclass
class SubjectSpec:
    """What can be known of a subject without loading its weights (for manifests and done() checks)."""

    identity: dict[str, Any]  # manifest `model`: kind, name, revision / hashes
    n_layers: int
    max_context: int  # longest context the model takes
    vocab_size: int
    tokenizer_fingerprint: str | None = None  # of the tokenizer the model expects, when known
    extra: dict[str, Any] = field(default_factory=dict)

    def check_layers(self, layers: Iterable[int], key: str) -> None:
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad:
            raise UserError(f"config `{key}`: layer(s) {bad} do not exist; {self.identity.get('name')} has "
                            f"{self.n_layers} layers (0..{self.n_layers - 1})")

    def check_tokens(self, meta: Mapping[str, Any] | None, where: Path) -> None:
        """A named error when the tokens were prepared with another tokenizer than the subject's."""
        if not meta:
            return
        got, want = (meta.get("tokenizer_info") or {}).get("fingerprint"), self.tokenizer_fingerprint
        if got and want and got != want:
            raise UserError(f"{where}: tokens were prepared with tokenizer {meta.get('tokenizer')!r} "
                            f"(fingerprint {got[:12]}), but the subject {self.identity.get('name')!r} "
                            f"expects fingerprint {want[:12]}; rerun transformer.prepare with this subject")
        v = meta.get("vocab_size")
        if isinstance(v, int) and v > self.vocab_size:
            raise UserError(f"{where}: vocab_size {v} exceeds the subject's {self.vocab_size} "
                            "(tokens from another tokenizer?)")


class Subject(ABC):
    """A model seen through named hook points. Attributes: `spec`, `n_layers`, `d_model`, `d_mlp`,
    `vocab_size`, `max_context`, `device`, `tokenizer` (set by `load_subject`)."""

    spec: SubjectSpec
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    max_context: int
    device: torch.device
    # Set by `load_subject`: what builds the tokenizer (`transformer.tokenizer.load_tokenizer`) on first
    # use; the Subject's own methods never need it, and a model folder may come without one.
    tokenizer_loader: Callable[[], Any] | None = None

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The subject's tokenizer (encode, decode, token_bytes, fingerprint), loaded on first use."""
        if self.tokenizer_loader is None:
            raise UserError(f"subject {self.name!r} has no tokenizer")
        return self.tokenizer_loader()

    @property
    def name(self) -> str:
        return str(self.spec.identity.get("name"))

    def hook_names(self) -> list[str]:
        return [hook_point(k, layer) for layer in range(self.n_layers) for k in HOOK_KINDS]

    def width(self, hook: str) -> int:
        self.check_hooks([hook])
        return self.d_mlp if hook_kind(hook) == "neurons" else self.d_model

    def check_hooks(self, hooks: Iterable[str]) -> list[str]:
        hooks = list(hooks)
        for h in hooks:
            layer, _ = parse_hook(h)
            if not 0 <= layer < self.n_layers:
                per_layer = ", ".join("blocks.<L>." + s for s in HOOK_KINDS.values())
                raise UserError(f"hook point {h!r}: {self.name} has layers 0..{self.n_layers - 1}; "
                                f"hook points per layer: {per_layer}")
        if not hooks:
            raise UserError("no hook point given")
        return hooks

    @abstractmethod
    def capture(self, idx: torch.Tensor, hooks: Iterable[str]) -> dict[str, torch.Tensor]:
        """Each hook point's value [B, T, width] in one forward that stops after the last one."""

    @abstractmethod
    def logits(self, idx: torch.Tensor, edits: Mapping[str, Edit] | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] with each hook point in `edits` replaced by `fn(value)`."""

    def loss(self, idx: torch.Tensor, targets: torch.Tensor,
             edits: Mapping[str, Edit] | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (targets -1 ignored) under `edits`."""
        logits = self.logits(idx, edits)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-1)

    @abstractmethod
    def neuron_out_weight(self, layer: int) -> torch.Tensor:
        """The MLP output matrix of `layer`, [d_model, d_mlp]: neuron i writes column i."""

    @abstractmethod
    def unembedding(self) -> torch.Tensor:
        """[vocab, d_model]: the unembedding with the final norm's scale folded in, so a residual
        direction v has direct logit effects `unembedding() @ v`."""


# ---------------------------------------------------------------------------------------- GPT


class GPTSubject(Subject):
    """Our GPT (transformer.model.GPT) block by block, with the same operations as `Block.forward`, so
    captured values and unedited logits are bitwise the model's own."""

    def __init__(self, model: Any, spec: SubjectSpec | None = None):
        self.model = model
        c = model.config
        self.n_layers, self.d_model, self.d_mlp = c.n_layer, c.n_embd, c.d_mlp
        self.vocab_size, self.max_context = c.vocab_size, c.block_size
        self.device = next(model.parameters()).device
        self.spec = spec or SubjectSpec({"kind": "gpt", "name": "gpt"}, c.n_layer, c.block_size, c.vocab_size)

    @torch.no_grad()
    def _walk(self, idx: torch.Tensor, edits: Mapping[str, Edit], keep: set[str],
              stop: str | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        got: dict[str, torch.Tensor] = {}

        def at(layer: int, kind: str, value: torch.Tensor) -> torch.Tensor:
            name = hook_point(kind, layer)
            if name in edits:
                value = edits[name](value)
            if name in keep:
                got[name] = value
            return value

        x = self.model._embed(idx)
        for layer, block in enumerate(self.model.transformer.h):
            x = x + block.attn(block.ln_1(x))
            h = at(layer, "neurons", block.mlp.hidden(block.ln_2(x)))
            if stop == hook_point("neurons", layer):
                return got, None
            m = at(layer, "mlp_out", block.mlp.out(h))
            if stop == hook_point("mlp_out", layer):
                return got, None
            x = at(layer, "resid_post", x + m)
            if stop == hook_point("resid_post", layer):
                return got, None
        return got, self.model.lm_head(self.model.transformer.ln_f(x))

    def capture(self, idx: torch.Tensor, hooks: Iterable[str]) -> dict[str, torch.Tensor]:
        hooks = self.check_hooks(hooks)
        got, _ = self._walk(idx, {}, set(hooks), last_hook(hooks))
        return got

    def logits(self, idx: torch.Tensor, edits: Mapping[str, Edit] | None = None) -> torch.Tensor:
        edits = dict(edits or {})
        if edits:
            self.check_hooks(edits)
        return self._walk(idx, edits, set(), None)[1]

    def neuron_out_weight(self, layer: int) -> torch.Tensor:
        self.check_hooks([hook_point("neurons", layer)])
        return self.model.transformer.h[layer].mlp.c_proj.weight

    def unembedding(self) -> torch.Tensor:
        return self.model.lm_head.weight * self.model.transformer.ln_f.weight
