"""A Hugging Face causal LM as a Subject, through forward (pre-)hooks on its own modules.

Neurons are the input of the MLP's output projection: Llama/Mistral/Qwen `mlp.down_proj` (the gated
product act(gate)·up, signed), GPT-2 `mlp.c_proj`, GPT-NeoX `mlp.dense_4h_to_h` (post-activation).
`blocks.L.hook_mlp_out` is the MLP module's output, `blocks.L.hook_resid_post` the decoder layer's.
A capture raises out of the forward right after its last hook point, so later layers never run.
Other architectures: `subject.neuron_module=model.layers.{layer}.mlp.down_proj` (any module path
with `{layer}`; its parent is taken as the MLP).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tools.core.config import UserError
from transformer.subject import Edit, Subject, SubjectSpec, hook_kind, last_hook, parse_hook
from transformer.subject_config import SubjectConfig

HF_CONTEXT_CAP = 1024  # default context length of an HF subject when `activations.block_size` is null


@dataclass(frozen=True)
class Arch:
    layers: str  # path of the ModuleList of decoder layers
    neuron: str  # path, inside a layer, of the module whose input is the neuron vector
    final_norm: str | None  # path of the norm before the unembedding (its scale is folded in)


_LLAMA = Arch("model.layers", "mlp.down_proj", "model.norm")
ARCHS = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gpt2": Arch("transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gpt_neox": Arch("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
}
_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm")


def resolve_arch(model_type: str, neuron_module: str | None) -> Arch:
    """The architecture's module paths; `subject.neuron_module` overrides the neuron module."""
    if neuron_module:
        if ".{layer}." not in neuron_module:
            raise UserError(f"config `subject.neuron_module`={neuron_module!r}: expected a module path "
                            "with `.{layer}.`, e.g. model.layers.{layer}.mlp.down_proj")
        layers, neuron = neuron_module.split(".{layer}.", 1)
        known = ARCHS.get(model_type)
        return Arch(layers, neuron, known.final_norm if known else None)
    if model_type not in ARCHS:
        raise UserError(f"architecture {model_type!r} has no known MLP-neuron hook (known: "
                        f"{', '.join(sorted(ARCHS))}); pass subject.neuron_module=<module path with "
                        "{layer}> naming the module whose input is the neuron vector, e.g. "
                        "subject.neuron_module=model.layers.{layer}.mlp.down_proj")
    return ARCHS[model_type]


def _get(root: torch.nn.Module, path: str, what: str) -> torch.nn.Module:
    mod = root
    for i, part in enumerate(path.split(".")):
        children = dict(mod.named_children())
        if part not in children:
            where = ".".join(path.split(".")[:i]) or "the model"
            have = ", ".join(children) or "none"
            raise UserError(f"{what}: no module {part!r} in {where} (it has: {have})")
        mod = children[part]
    return mod


class _Stop(Exception):
    """Raised by the last hook of a capture to end the forward there."""


class HFSubject(Subject):
    def __init__(self, model: Any, sc: SubjectConfig, spec: SubjectSpec):
        self.model, self.spec = model, spec
        self.arch = resolve_arch(model.config.model_type, sc.neuron_module)
        what = f"{model.config.model_type} model ({type(model).__name__})"
        blocks = _get(model, self.arch.layers, what)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise UserError(f"{what}: {self.arch.layers} is not a list of layers")
        self.blocks = blocks
        self.n_layers = len(blocks)
        self.mlp_path, _, _ = self.arch.neuron.rpartition(".")
        down = _get(blocks[0], self.arch.neuron, f"{what} layer 0")
        self.d_mlp = _in_width(down)
        emb = model.get_input_embeddings().weight
        self.d_model, self.device = emb.shape[1], emb.device
        self.vocab_size, self.max_context = spec.vocab_size, spec.max_context

    def _site(self, hook: str) -> tuple[torch.nn.Module, bool]:
        """The module of a hook point and whether it reads the module's input (a pre-hook)."""
        layer, _ = parse_hook(hook)
        block, kind = self.blocks[layer], hook_kind(hook)
        if kind == "neurons":
            return _get(block, self.arch.neuron, f"layer {layer}"), True
        if kind == "mlp_out":
            return (_get(block, self.mlp_path, f"layer {layer}") if self.mlp_path else block), False
        return block, False

    @contextlib.contextmanager
    def _hooks(self, edits: Mapping[str, Edit], keep: Iterable[str], stop: str | None) -> Iterator[dict]:
        got: dict[str, torch.Tensor] = {}
        handles = []

        def handler(name: str, pre: bool):
            def replace(value: torch.Tensor) -> torch.Tensor:
                if name in edits:
                    value = edits[name](value)
                if name in keep:
                    got[name] = value
                if name == stop:
                    raise _Stop
                return value

            if pre:
                return lambda mod, args: (replace(args[0]), *args[1:])

            def post(mod, args, out):
                if isinstance(out, tuple):
                    return (replace(out[0]), *out[1:])
                return replace(out)
            return post

        try:
            for name in dict.fromkeys([*edits, *keep]):
                mod, pre = self._site(name)
                h = handler(name, pre)
                handles.append(mod.register_forward_pre_hook(h) if pre else mod.register_forward_hook(h))
            yield got
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def capture(self, idx: torch.Tensor, hooks: Iterable[str]) -> dict[str, torch.Tensor]:
        hooks = self.check_hooks(hooks)
        with self._hooks({}, hooks, last_hook(hooks)) as got:
            try:
                self.model(input_ids=idx, use_cache=False)
            except _Stop:
                pass
        return got

    @torch.no_grad()
    def logits(self, idx: torch.Tensor, edits: Mapping[str, Edit] | None = None) -> torch.Tensor:
        edits = dict(edits or {})
        if edits:
            self.check_hooks(edits)
        with self._hooks(edits, [], None):
            return self.model(input_ids=idx, use_cache=False).logits

    def neuron_out_weight(self, layer: int) -> torch.Tensor:
        mod, _ = self._site(f"blocks.{layer}.mlp.hook_post")
        w = mod.weight
        return w if isinstance(mod, torch.nn.Linear) else w.t()  # GPT-2's Conv1D stores [in, out]

    def unembedding(self) -> torch.Tensor:
        w = self.model.get_output_embeddings().weight  # [vocab, d_model]
        paths = [self.arch.final_norm] if self.arch.final_norm else list(_NORMS)
        for path in paths:
            try:
                norm = _get(self.model, path, "final norm")
            except UserError:
                continue
            return w * norm.weight
        raise UserError(f"{type(self.model).__name__}: no final norm found at {', '.join(paths)}")


def _in_width(mod: torch.nn.Module) -> int:
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features
    if hasattr(mod, "nx"):  # transformers' Conv1D
        return int(mod.nx)
    w = getattr(mod, "weight", None)
    if w is None or w.dim() != 2:
        raise UserError(f"neuron module {type(mod).__name__} has no 2-D weight to read its width from")
    return int(w.shape[1])


def _tokenizer_fingerprint(sc: SubjectConfig, data_dir: str) -> str | None:
    """The fingerprint of the subject's tokenizer, to compare with the tokens' meta.json; None for a
    model folder that comes without a tokenizer."""
    from transformer.tokenizer import load_tokenizer

    try:
        return load_tokenizer(sc, data_dir).fingerprint
    except UserError:
        return None


_SPECS: dict[tuple, SubjectSpec] = {}  # per process: weights are hashed once while their files stay the same


def hf_spec(sc: SubjectConfig, data_dir: str) -> SubjectSpec:
    """An HF subject's spec from its config (no weights loaded), identity with weight hashes."""
    from transformer.hf_load import resolve_model_path

    path = resolve_model_path(sc, data_dir)
    files = sorted(Path(path).glob("*")) if Path(path).is_dir() else []
    key = (path, sc.revision, sc.neuron_module, sc.embedded,
           tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()))
    if key not in _SPECS:
        _SPECS[key] = _hf_spec(sc, data_dir, path)
    return copy.deepcopy(_SPECS[key])


def _hf_spec(sc: SubjectConfig, data_dir: str, path: str) -> SubjectSpec:
    from transformers import AutoConfig

    from transformer.hf_load import _from_pretrained, model_identity

    conf = _from_pretrained(AutoConfig, path, "model config", revision=sc.revision)
    ident = model_identity(sc, data_dir, SimpleNamespace(config=conf))
    ident["architecture"] = conf.model_type
    resolve_arch(conf.model_type, sc.neuron_module)  # unknown architectures fail before any work
    max_ctx = int(getattr(conf, "max_position_embeddings", None) or HF_CONTEXT_CAP)
    return SubjectSpec(ident, int(conf.num_hidden_layers), max_ctx, int(conf.vocab_size),
                       _tokenizer_fingerprint(sc, data_dir),
                       {"default_context": min(max_ctx, HF_CONTEXT_CAP)})
