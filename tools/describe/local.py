"""An in-process Hugging Face chat model for the describe stage (`describe=local`).

One object serves both roles: `chat` generates an explanation from the model's chat template and
answers in the OpenAI response shape (so the LLM explainer does not care which backend it talks
to), and `slot_distributions` runs the all-at-once simulator's single forward pass over a batch of
prompts, returning the next-token distribution over the label tokens at every slot. The model is
loaded by `transformer.hf_load` (embedded name, hub name or folder), bfloat16 on CUDA and float32 on
CPU by default, and never trained.
"""

from __future__ import annotations

import copy
import inspect
import threading
from dataclasses import dataclass
from typing import Any

import torch

from tools.core.config import UserError
from tools.describe.client import Usage
from transformer.hf_load import load_causal_lm, load_hf_tokenizer
from transformer.subject_config import SubjectConfig


@dataclass
class LocalModelConfig:
    model: str | None = None  # hub name or local folder
    embedded: str | None = None  # e.g. smollm2-135m-instruct (converted into data_dir/models)
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "cpu"
    data_dir: str = "data"
    batch_tokens: int = 8192  # padded prompt tokens per simulator forward (bounds memory)

    def name(self) -> str:
        return str(self.embedded or self.model)


def default_labels(tokenizer: Any, sep: str) -> list[str]:
    """0-10 when "10" is one token after `sep`, else 0-9 (SmolLM2, Llama-2, Mistral, Qwen)."""
    wide = [str(i) for i in range(11)]
    return wide if _label_problem(tokenizer, "10", sep) is None else wide[:10]


def _label_problem(tokenizer: Any, label: str, sep: str) -> str | None:
    alone = tokenizer.encode(label, add_special_tokens=False)
    if len(alone) != 1:
        return f"{label!r} is {len(alone)} tokens {alone}"
    joined = tokenizer.encode(sep + label, add_special_tokens=False)
    if joined != tokenizer.encode(sep, add_special_tokens=False) + alone:
        return f"{label!r} after {sep!r} tokenizes as {joined}, not as the separator then {alone}"
    return None


def label_ids(tokenizer: Any, labels: list[str], sep: str) -> list[int]:
    """The token id of every label; a label that is not one token (alone and after `sep`) is an error."""
    if len(labels) < 2:
        raise UserError(f"config `describe.labels`: need at least two labels, got {labels!r}")
    problems = [p for p in (_label_problem(tokenizer, lab, sep) for lab in labels) if p]
    if problems:
        raise UserError("config `describe.labels`: every simulator label must be a single token of the "
                        f"model's vocabulary; {problems[0]} (use labels such as 0-9)")
    ids = [tokenizer.encode(lab, add_special_tokens=False)[0] for lab in labels]
    if len(set(ids)) != len(ids):
        raise UserError(f"config `describe.labels`: labels {labels!r} share a token")
    return ids


class LocalLM:
    def __init__(self, lc: LocalModelConfig):
        sc = SubjectConfig(kind="hf", model=lc.model, embedded=lc.embedded, dtype=lc.dtype).check()
        self.lc = lc
        self.tokenizer = load_hf_tokenizer(sc, lc.data_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"describe model {lc.name()!r} has no chat template (tokenizer_config.json "
                            "`chat_template`); use an instruct/chat model")
        self.model = load_causal_lm(sc, lc.data_dir, lc.device)
        self.device = next(self.model.parameters()).device
        self.usage = Usage()
        self._lock = threading.Lock()  # one forward at a time: the model is shared by workers
        params = inspect.signature(self.model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- explainer ------------------------------------------------------------------------------
    @torch.inference_mode()
    def chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0,
             usage: Usage | None = None, seed: int | None = None, **_: Any) -> dict[str, Any]:
        """Generate one answer from the chat template, returned as an OpenAI chat completion."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                 return_tensors="pt")
        input_ids = ids["input_ids"].to(self.device)
        kw: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": self.pad_id}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock:
            if temperature > 0:
                torch.manual_seed(0 if seed is None else seed)
            out = self.model.generate(input_ids, attention_mask=ids["attention_mask"].to(self.device), **kw)
        new = out[0, input_ids.shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        counts = {"calls": 1, "prompt_tokens": int(input_ids.shape[1]), "completion_tokens": int(new.numel())}
        self._count(usage, **counts)
        return {"choices": [{"message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": counts["prompt_tokens"],
                          "completion_tokens": counts["completion_tokens"]}}

    # -- all-at-once simulator ------------------------------------------------------------------
    @torch.inference_mode()
    def slot_distributions(self, head: list[int], bodies: list[list[int]], slots: list[list[int]],
                           label_ids: list[int], usage: Usage | None = None) -> list[torch.Tensor]:
        """Prompts `head + body` for each body: softmax over `label_ids` of the next-token logits at
        each slot (an index into the body: the position whose next token is the label). The shared
        head is run once and its key/value cache reused; bodies go in batches of at most
        `batch_tokens` padded tokens, one forward each, with logits computed at the slots only."""
        head_t = torch.tensor([head], device=self.device)
        order = sorted(range(len(bodies)), key=lambda i: len(bodies[i]))
        out: list[torch.Tensor | None] = [None] * len(bodies)
        lm_head = self.model.get_output_embeddings()
        base = self.model.base_model
        lab = torch.tensor(label_ids, device=self.device)
        with self._lock:
            cache = base(input_ids=head_t, use_cache=True).past_key_values
        self._count(usage, forwards=1, prompt_tokens=len(head))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and len(bodies[order[end]]) * (end - start + 1) <= self.lc.batch_tokens:
                end += 1
            batch = order[start:end]
            longest = len(bodies[batch[-1]])
            ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), len(head) + longest), dtype=torch.long)
            mask[:, : len(head)] = 1
            for row, i in enumerate(batch):  # right padding: pads never precede a real token
                ids[row, : len(bodies[i])] = torch.tensor(bodies[i])
                mask[row, len(head): len(head) + len(bodies[i])] = 1
            with self._lock:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(batch))
                hidden = base(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                              use_cache=True, **{self._cache_kw: past}).last_hidden_state
                for row, i in enumerate(batch):
                    pos = torch.tensor(slots[i], device=self.device)
                    logits = lm_head(hidden[row, pos]).float()[:, lab]
                    out[i] = torch.softmax(logits, dim=-1).cpu()
            self._count(usage, forwards=1, prompt_tokens=int(mask[:, len(head):].sum()))
            start = end
        return [t for t in out if t is not None]

    def _count(self, usage: Usage | None, **counts: int) -> None:
        self.usage.add(**counts)
        if usage is not None:
            usage.add(**counts)
