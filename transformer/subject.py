"""The subject: the model whose units later stages read, edit and describe, behind one interface.

Stages reach a model only through `Subject`: hook points named TransformerLens-style, per block L,
in the order a forward computes them,
  * `blocks.{L}.hook_resid_pre`: the residual stream entering block L,
  * `blocks.{L}.hook_resid_mid`: after the attention's residual add, before the MLP's norm,
  * `blocks.{L}.ln2.hook_normalized`: the MLP's input after that norm (what a transcoder reads),
  * `blocks.{L}.mlp.hook_post`: the MLP neurons (the input of the MLP's output projection),
  * `blocks.{L}.hook_mlp_out`: the MLP's output (as added to the residual stream),
  * `blocks.{L}.hook_resid_post`: the residual stream after block L,
`capture` (several hook points in one forward that stops after the last hooked layer), `logits` /
`loss` with hook points replaced (SAE splice-in, zero- or mean-ablation, or a `Splice` that writes
one hook point from another's value, a transcoder in place of the MLP), and the weights of direct
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
# kind -> hook-point suffix, in the order a block computes them
HOOK_KINDS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "mlp_in": "ln2.hook_normalized",
              "neurons": "mlp.hook_post", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
_ORDER = {suffix: i for i, suffix in enumerate(HOOK_KINDS.values())}  # order within a block
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in HOOK_KINDS.values()) + r")$")


def hook_point(kind: str, layer: int) -> str:
    """`hook_point("neurons", 3)` -> `blocks.3.mlp.hook_post`."""
    if kind not in HOOK_KINDS:
        raise UserError(f"unknown hook kind {kind!r}: expected one of {' | '.join(HOOK_KINDS)}")
    return f"blocks.{layer}.{HOOK_KINDS[kind]}"


def parse_hook(name: str) -> tuple[int, str]:
    """`blocks.3.mlp.hook_post` -> (3, "mlp.hook_post"); anything else is a UserError."""
    m = _HOOK_RE.match(name) if isinstance(name, str) else None
    if not m:
        raise UserError(f"hook point {name!r} is not blocks.<layer>.(" + "|".join(HOOK_KINDS.values()) + ")")
    return int(m.group(1)), m.group(2)


def hook_kind(name: str) -> str:
    """`blocks.3.ln2.hook_normalized` -> "mlp_in"."""
    suffix = parse_hook(name)[1]
    return next(k for k, s in HOOK_KINDS.items() if s == suffix)


def hook_order(name: str) -> tuple[int, int]:
    """Where a hook point comes in a forward: (layer, position within the block)."""
    layer, suffix = parse_hook(name)
    return layer, _ORDER[suffix]


def last_hook(hooks: Iterable[str]) -> str:
    """The hook point computed last in a forward pass (where a capture may stop)."""
    return max(hooks, key=hook_order)


@dataclass(frozen=True)
class Splice:
    """An edit that replaces a hook point's value with `fn(value of source)`, `source` a hook point
    computed earlier in the same forward (after its own edit, if any)."""

    source: str
    fn: Edit


AnyEdit = Edit | Splice


def splice_edits(hook_in: str, hook_out: str, fn: Edit) -> dict[str, AnyEdit]:
    """The edits that put a dictionary's reconstruction `fn(x_in)` in place of `hook_out`: a plain edit
    when it reads and writes one hook point (an SAE), a `Splice` otherwise (a transcoder reading
    `blocks.L.ln2.hook_normalized` and writing `blocks.L.hook_mlp_out`)."""
    if hook_in == hook_out:
        return {hook_out: fn}
    return {hook_out: Splice(hook_in, fn)}


def transcoder_splice(layer: int, fn: Edit) -> dict[str, AnyEdit]:
    """`fn(mlp_in)` in place of the MLP's output of `layer` (loss recovered of a transcoder)."""
    return splice_edits(hook_point("mlp_in", layer), hook_point("mlp_out", layer), fn)


class StopForward(Exception):
    """Raised by a forward's last needed hook point to end the forward there."""


class EditRun:
    """One forward's edits and captures: `run(name, value)` at each hook point applies its edit (a
    `Splice` reads its source's value from earlier in the forward), keeps what was asked, and raises
    `StopForward` at `stop`."""

    def __init__(self, edits: Mapping[str, AnyEdit], keep: Iterable[str], stop: str | None):
        self.edits, self.keep, self.stop = dict(edits), set(keep), stop
        self.sources = {e.source for e in self.edits.values() if isinstance(e, Splice)}
        self.got: dict[str, torch.Tensor] = {}
        self.seen: dict[str, torch.Tensor] = {}
        self.busy = False

    def names(self) -> list[str]:
        """Every hook point this forward must visit."""
        return list(dict.fromkeys([*self.edits, *self.keep, *self.sources]))

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if self.busy:  # an edit that runs the model's own modules (the MLP itself) passes hooks through
            return value
        e = self.edits.get(name)
        if e is not None:
            self.busy = True
            try:
                new = e.fn(self.seen[e.source]) if isinstance(e, Splice) else e(value)
            finally:
                self.busy = False
            if not isinstance(new, torch.Tensor) or new.shape != value.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise UserError(f"edit of {name}: returned {got}, expected a tensor of shape "
                                f"{tuple(value.shape)}")
            value = new
        if name in self.sources:
            self.seen[name] = value
        if name in self.keep:
            self.got[name] = value
        if name == self.stop:
            raise StopForward
        return value


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

    def check_kinds(self, kinds: Iterable[str], key: str) -> None:
        """A named error for a hook kind the model lacks (`extra["hook_unavailable"]`: kind -> why)."""
        missing = self.extra.get("hook_unavailable") or {}
        for kind in kinds:
            if kind in missing:
                have = " | ".join(k for k in HOOK_KINDS if k not in missing)
                raise UserError(f"config `{key}`: {self.identity.get('name')} has no {kind} hook point "
                                f"({missing[kind]}); it has: {have}")

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

    # hook kinds this model lacks -> why (e.g. resid_mid of a parallel attention + MLP block)
    unavailable: Mapping[str, str] = {}

    def hook_names(self) -> list[str]:
        """Every hook point the model has, in forward order."""
        kinds = [k for k in HOOK_KINDS if k not in self.unavailable]
        return [hook_point(k, layer) for layer in range(self.n_layers) for k in kinds]

    def width(self, hook: str) -> int:
        self.check_hooks([hook])
        return self.d_mlp if hook_kind(hook) == "neurons" else self.d_model

    def check_hooks(self, hooks: Iterable[str]) -> list[str]:
        """The hook points as a list; a UserError naming the first one this model does not have."""
        hooks = list(hooks)
        per_layer = ", ".join("blocks.<L>." + s for k, s in HOOK_KINDS.items() if k not in self.unavailable)
        for h in hooks:
            layer, _ = parse_hook(h)
            if not 0 <= layer < self.n_layers:
                raise UserError(f"hook point {h!r}: {self.name} has layers 0..{self.n_layers - 1}; "
                                f"hook points per layer: {per_layer}")
            kind = hook_kind(h)
            if kind in self.unavailable:
                raise UserError(f"hook point {h!r}: {self.name} has no {kind} hook point "
                                f"({self.unavailable[kind]}); hook points per layer: {per_layer}")
        if not hooks:
            raise UserError("no hook point given")
        return hooks

    def check_edits(self, edits: Mapping[str, AnyEdit]) -> None:
        """Every edited hook point exists; a `Splice` reads a hook point computed before its target."""
        if not edits:
            return
        self.check_hooks(edits)
        for target, e in edits.items():
            if isinstance(e, Splice):
                self.check_hooks([e.source])
                if hook_order(e.source) >= hook_order(target):
                    raise UserError(f"splice into {target} reads {e.source}, which the forward does not "
                                    "compute before it")

    @abstractmethod
    def capture(self, idx: torch.Tensor, hooks: Iterable[str]) -> dict[str, torch.Tensor]:
        """Each hook point's value [B, T, width] in one forward that stops after the last one."""

    @abstractmethod
    def logits(self, idx: torch.Tensor, edits: Mapping[str, AnyEdit] | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] with each hook point in `edits` replaced by `fn(value)` (a `Splice`:
        by `fn(value of its source)`)."""

    def loss(self, idx: torch.Tensor, targets: torch.Tensor,
             edits: Mapping[str, AnyEdit] | None = None) -> torch.Tensor:
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
    def _walk(self, idx: torch.Tensor, run: EditRun) -> torch.Tensor | None:
        """The forward of `GPT.forward`, each hook point passed through `run`; None when it stopped."""
        try:
            x = self.model._embed(idx)
            for layer, block in enumerate(self.model.transformer.h):
                def at(kind: str, value: torch.Tensor, layer: int = layer) -> torch.Tensor:
                    return run(hook_point(kind, layer), value)

                x = at("resid_pre", x)
                x = at("resid_mid", x + block.attn(block.ln_1(x)))
                h = at("neurons", block.mlp.hidden(at("mlp_in", block.ln_2(x))))
                x = at("resid_post", x + at("mlp_out", block.mlp.out(h)))
        except StopForward:
            return None
        return self.model.lm_head(self.model.transformer.ln_f(x))

    def capture(self, idx: torch.Tensor, hooks: Iterable[str]) -> dict[str, torch.Tensor]:
        hooks = self.check_hooks(hooks)
        run = EditRun({}, hooks, last_hook(hooks))
        self._walk(idx, run)
        return run.got

    def logits(self, idx: torch.Tensor, edits: Mapping[str, AnyEdit] | None = None) -> torch.Tensor:
        edits = dict(edits or {})
        self.check_edits(edits)
        return self._walk(idx, EditRun(edits, (), None))

    def neuron_out_weight(self, layer: int) -> torch.Tensor:
        self.check_hooks([hook_point("neurons", layer)])
        return self.model.transformer.h[layer].mlp.c_proj.weight

    def unembedding(self) -> torch.Tensor:
        return self.model.lm_head.weight * self.model.transformer.ln_f.weight
