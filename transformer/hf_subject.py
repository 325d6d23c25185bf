"""A Hugging Face causal LM as a Subject, through forward (pre-)hooks on its own modules.

Per decoder layer (`Arch` names the modules of each architecture):
  * `hook_resid_pre`: the layer's input; `hook_resid_post`: its output;
  * `hook_resid_mid`: the input of the norm before the MLP (`Arch.ln2`: Llama/Mistral/Qwen/NeoX
    `post_attention_layernorm`, GPT-2 `ln_2`, Gemma `pre_feedforward_layernorm`), i.e. the residual
    after attention. An edit there is applied to the norm's input and its difference added to the
    MLP's output, so the layer's residual carries the edited value. GPT-NeoX with
    `use_parallel_residual` (Pythia) has no such point: attention and MLP both read resid_pre;
  * `ln2.hook_normalized`: that norm's output, the MLP's input (what a transcoder reads);
  * neurons: the input of the MLP's output projection: Llama/Mistral/Qwen/Gemma `mlp.down_proj`
    (the gated product act(gate)·up, signed), GPT-2 `mlp.c_proj`, GPT-NeoX `mlp.dense_4h_to_h`;
  * `hook_mlp_out`: the MLP module's output, for Gemma after `post_feedforward_layernorm` (what is
    added to the residual, as in TransformerLens).
A capture raises out of the forward right after its last hook point, so later layers never run.
Other architectures: `subject.neuron_module=model.layers.{layer}.mlp.down_proj` (any module path
with `{layer}`; its parent is taken as the MLP; resid_mid and ln2.hook_normalized then need a known
architecture).
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
from transformer.subject import (
    AnyEdit,
    EditRun,
    StopForward,
    Subject,
    SubjectSpec,
    hook_kind,
    last_hook,
    parse_hook,
)
from transformer.subject_config import SubjectConfig

HF_CONTEXT_CAP = 1024  # default context length of an HF subject when `activations.block_size` is null


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture (paths inside a layer are relative to the decoder layer)."""

    layers: str  # path of the ModuleList of decoder layers
    neuron: str  # path, inside a layer, of the module whose input is the neuron vector
    final_norm: str | None  # path of the norm before the unembedding (its scale is folded in)
    ln2: str | None = None  # path, inside a layer, of the norm the MLP reads; None: no resid_mid / mlp_in
    mlp_out: str | None = None  # path, inside a layer, of the module whose output is hook_mlp_out
    # (None: the neuron module's parent, the MLP)
    norm_offset: float = 0.0  # the final norm scales by offset + weight (Gemma's RMSNorm: 1)


_LLAMA = Arch("model.layers", "mlp.down_proj", "model.norm", "post_attention_layernorm")
_GEMMA2 = Arch("model.layers", "mlp.down_proj", "model.norm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", 1.0)
ARCHS = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gpt2": Arch("transformer.h", "mlp.c_proj", "transformer.ln_f", "ln_2"),
    "gpt_neox": Arch("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm",
                     "post_attention_layernorm"),
    "gemma": Arch("model.layers", "mlp.down_proj", "model.norm", "post_attention_layernorm", None, 1.0),
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "gemma3": Arch("model.language_model.layers", "mlp.down_proj", "model.language_model.norm",
                   "pre_feedforward_layernorm", "post_feedforward_layernorm", 1.0),
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
        if known is None:
            return Arch(layers, neuron, None)
        return Arch(layers, neuron, known.final_norm, known.ln2, known.mlp_out, known.norm_offset)
    if model_type not in ARCHS:
        raise UserError(f"architecture {model_type!r} has no known MLP-neuron hook (known: "
                        f"{', '.join(sorted(ARCHS))}); pass subject.neuron_module=<module path with "
                        "{layer}> naming the module whose input is the neuron vector, e.g. "
                        "subject.neuron_module=model.layers.{layer}.mlp.down_proj")
    return ARCHS[model_type]


def unavailable_kinds(arch: Arch, config: Any) -> dict[str, str]:
    """Hook kinds the architecture lacks -> why, from its module paths and config alone."""
    out = {}
    if arch.ln2 is None:
        why = "the norm before the MLP is known only for " + ", ".join(sorted(ARCHS))
        out = {"resid_mid": why, "mlp_in": why}
    text = getattr(config, "text_config", None) or config
    if getattr(text, "use_parallel_residual", False) and getattr(config, "model_type", "") == "gpt_neox":
        out["resid_mid"] = ("use_parallel_residual: attention and MLP both read the layer's input, "
                            "blocks.L.hook_resid_pre")
    return out


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


def _map_out(out: Any, fn) -> Any:
    """A module's output with its main tensor (a tuple's first item) replaced by `fn(tensor)`."""
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


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
        self.mlp_out_path = self.arch.mlp_out if self.arch.mlp_out is not None else \
            self.arch.neuron.rpartition(".")[0]
        down = _get(blocks[0], self.arch.neuron, f"{what} layer 0")
        for path in (self.arch.ln2, self.mlp_out_path):
            if path:
                _get(blocks[0], path, f"{what} layer 0")
        self.unavailable = unavailable_kinds(self.arch, model.config)
        self.d_mlp = _in_width(down)
        emb = model.get_input_embeddings().weight
        self.d_model, self.device = emb.shape[1], emb.device
        self.vocab_size, self.max_context = spec.vocab_size, spec.max_context

    def _site(self, hook: str) -> tuple[torch.nn.Module, str]:
        """The module of a hook point and what it reads: `pre` (the module's input) or `post` (output)."""
        layer, _ = parse_hook(hook)
        block, kind = self.blocks[layer], hook_kind(hook)
        where = f"layer {layer}"
        if kind == "neurons":
            return _get(block, self.arch.neuron, where), "pre"
        if kind == "mlp_out":
            return (_get(block, self.mlp_out_path, where) if self.mlp_out_path else block), "post"
        if kind in ("resid_mid", "mlp_in"):
            return _get(block, str(self.arch.ln2), where), "pre" if kind == "resid_mid" else "post"
        return block, "pre" if kind == "resid_pre" else "post"

    @contextlib.contextmanager
    def _hooks(self, run: EditRun) -> Iterator[None]:
        handles = []
        deltas: dict[int, torch.Tensor] = {}  # layer -> edited minus original resid_mid

        def handler(name: str, mode: str):
            if mode == "post":
                return lambda mod, args, out: _map_out(out, lambda v: run(name, v))
            if hook_kind(name) == "resid_mid":  # the norm's input: the edit's difference goes on below
                layer = parse_hook(name)[0]

                def mid(mod, args, kwargs):
                    new = run(name, args[0])
                    if name in run.edits:
                        deltas[layer] = new - args[0]
                    return (new, *args[1:]), kwargs
                return mid

            def pre(mod, args, kwargs):
                if args:
                    return (run(name, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": run(name, kwargs["hidden_states"])}
            return pre

        try:
            for name in run.names():
                mod, mode = self._site(name)
                h = handler(name, mode)
                handles.append(mod.register_forward_hook(h) if mode == "post"
                               else mod.register_forward_pre_hook(h, with_kwargs=True))
            for name in run.edits:  # after the mlp_out edits, so the difference is added to their result
                if hook_kind(name) == "resid_mid":
                    layer = parse_hook(name)[0]
                    mod, _ = self._site(name.replace("hook_resid_mid", "hook_mlp_out"))
                    handles.append(mod.register_forward_hook(
                        lambda m, a, out, layer=layer: _map_out(out, lambda v: v + deltas.pop(layer))))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def capture(self, idx: torch.Tensor, hooks: Iterable[str]) -> dict[str, torch.Tensor]:
        hooks = self.check_hooks(hooks)
        run = EditRun({}, hooks, last_hook(hooks))
        with self._hooks(run):
            try:
                self.model(input_ids=idx, use_cache=False)
            except StopForward:
                pass
        return run.got

    @torch.no_grad()
    def logits(self, idx: torch.Tensor, edits: Mapping[str, AnyEdit] | None = None) -> torch.Tensor:
        edits = dict(edits or {})
        self.check_edits(edits)
        with self._hooks(EditRun(edits, (), None)):
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
            return w * (norm.weight + self.arch.norm_offset)
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
    arch = resolve_arch(conf.model_type, sc.neuron_module)  # unknown architectures fail before any work
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf  # a multimodal model's LM
    max_ctx = int(getattr(text, "max_position_embeddings", None) or HF_CONTEXT_CAP)
    return SubjectSpec(ident, int(text.num_hidden_layers), max_ctx, int(text.vocab_size),
                       _tokenizer_fingerprint(sc, data_dir),
                       {"default_context": min(max_ctx, HF_CONTEXT_CAP),
                        "hook_unavailable": unavailable_kinds(arch, conf)})
