"""Real Hugging Face tokenizers built offline for tests: a byte-level BPE with a ChatML template
(as SmolLM2's) and a sentencepiece-style BPE with byte fallback (as Llama 2's)."""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! naïve café 日本語",
          "def main():\n    return 42\n", "the the the cat sat on the mat"] * 20


def byte_level(folder: Path, vocab_size: int = 400) -> Path:
    """A trained byte-level BPE (GPT-2 pre-tokenizer) with <|endoftext|>, <|im_start|>, <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token=None)
    fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def sentencepiece_style(folder: Path) -> Path:
    """A hand-built BPE over ▁-joined words with <0xNN> byte fallback and a Metaspace pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["\u2581", "h", "e", "l", "o", "w", "r", "d", "t", "a", "c"]:
        vocab[ch] = len(vocab)
    merges = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o"), ("\u2581", "hello"), ("c", "a"),
              ("ca", "t"), ("\u2581", "cat")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def wide(folder: Path, n_added: int = 66_000) -> Path:
    """The byte-level tokenizer plus `n_added` plain added tokens (`zq0`, `zq1`, ...): more than
    65,536 ids, so prepared tokens need uint32."""
    from transformers import AutoTokenizer

    byte_level(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([f"zq{i}" for i in range(n_added)])
    tok.save_pretrained(folder)
    return folder
