"""Tiny randomly initialised Hugging Face models (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX with and
without parallel residual, Gemma, Gemma-2, Gemma-3 text-only and multimodal) behind the Subject
interface."""

from __future__ import annotations

import torch

from transformer.hf_subject import HFSubject
from transformer.subject import SubjectSpec
from transformer.subject_config import SubjectConfig

V, D, M, N = 64, 16, 24, 3  # vocab, d_model, d_mlp, layers
HF_ARCHS = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "gpt_neox_seq", "gemma", "gemma2", "gemma3_text",
            "gemma3"]


def tiny_hf(arch: str):
    """A tiny random causal LM of `arch` (gpt_neox_seq: GPT-NeoX without parallel residual), in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    llama_like = dict(vocab_size=V, hidden_size=D, intermediate_size=M, num_hidden_layers=N,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like)).eval()
    if arch == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**llama_like, sliding_window=None)).eval()
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like)).eval()
    if arch == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**llama_like, head_dim=8)).eval()
    if arch == "gemma2":
        cfg = tf.Gemma2Config(**llama_like, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
        return _gemma_norms(tf.Gemma2ForCausalLM(cfg).eval())
    if arch.startswith("gemma3"):
        cfg = tf.Gemma3TextConfig(**llama_like, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
        if arch == "gemma3_text":
            return _gemma_norms(tf.Gemma3ForCausalLM(cfg).eval())
        vision = tf.SiglipVisionConfig(hidden_size=D, intermediate_size=M, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        both = tf.Gemma3Config(text_config=cfg, vision_config=vision, mm_tokens_per_image=4)
        return _gemma_norms(tf.Gemma3ForConditionalGeneration(both).eval())  # gemma-3-4b and up
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_embd=D, n_inner=M, n_layer=N, n_head=2, n_positions=32)
        return tf.GPT2LMHeadModel(cfg).eval()
    cfg = tf.GPTNeoXConfig(vocab_size=V, hidden_size=D, intermediate_size=M, num_hidden_layers=N,
                           num_attention_heads=2, max_position_embeddings=32,
                           use_parallel_residual=arch == "gpt_neox")
    return tf.GPTNeoXForCausalLM(cfg).eval()


def _gemma_norms(model):
    """Gemma's RMSNorm scales start at 0 (x (1 + w)): random ones, so a norm left out shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def hf_subject(model, **kw) -> HFSubject:
    spec = SubjectSpec({"kind": "hf", "name": "tiny"}, N, 32, V)
    return HFSubject(model, SubjectConfig(kind="hf", model="tiny", **kw), spec)


def tiny_llama_folder(folder, layers: int = 3):
    """A tiny random Llama saved to `folder` with a real byte-level tokenizer (vocab 400, ChatML)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.tokenizers import byte_level

    byte_level(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
