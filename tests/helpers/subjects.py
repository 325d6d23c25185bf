"""Tiny randomly initialised Hugging Face models (Llama, GPT-2, GPT-NeoX) behind the Subject interface."""

from __future__ import annotations

import torch

from transformer.hf_subject import HFSubject
from transformer.subject import SubjectSpec
from transformer.subject_config import SubjectConfig

V, D, M, N = 64, 16, 24, 3  # vocab, d_model, d_mlp, layers


def tiny_hf(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=M, num_hidden_layers=N,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        return tf.LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_embd=D, n_inner=M, n_layer=N, n_head=2, n_positions=32)
        return tf.GPT2LMHeadModel(cfg).eval()
    cfg = tf.GPTNeoXConfig(vocab_size=V, hidden_size=D, intermediate_size=M, num_hidden_layers=N,
                           num_attention_heads=2, max_position_embeddings=32)
    return tf.GPTNeoXForCausalLM(cfg).eval()


def hf_subject(model, **kw) -> HFSubject:
    spec = SubjectSpec({"kind": "hf", "name": "tiny"}, N, 32, V)
    return HFSubject(model, SubjectConfig(kind="hf", model="tiny", **kw), spec)
