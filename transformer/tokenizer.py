"""Tokenizers: one interface (`Tokenizer`) for GPT-2 BPE and Hugging Face tokenizers.

`load_tokenizer(subject, data_dir)` gives the subject's tokenizer: GPT-2 for our GPT, the model's
own (from its local folder) for a Hugging Face subject. GPT-2 BPE comes from the ranks file shipped
in `transformer/assets/` (no network).

`gpt2.tiktoken` comes from the openai-whisper sdist (MIT, see assets/LICENSE.gpt2-tiktoken); its
ranks equal tiktoken's "gpt2" encoding. The file is checked against a pinned sha256 at load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from tools.core.config import UserError
from tools.core.files import sha256_file

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_RANKS = ASSETS / "gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# The GPT-2 pre-tokenizer pattern (r50k), as published with the encoding.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
EOT = "<|endoftext|>"


@functools.lru_cache(maxsize=8)
def get_encoding(name: str = "gpt2", ranks_path: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """Return a tiktoken Encoding. "gpt2" is built offline from the shipped, hash-checked ranks.

    Other names (e.g. "cl100k_base") go through tiktoken's registry, which needs its cache or the
    network; the error says so when neither is there.
    """
    if name == "gpt2":
        path = Path(ranks_path) if ranks_path else GPT2_RANKS
        if not path.is_file():
            raise UserError(f"tokenizer ranks file not found: {path}")
        digest = sha256_file(path)
        if digest != GPT2_SHA256:
            raise UserError(
                f"tokenizer ranks file {path} has sha256 {digest}, expected {GPT2_SHA256}"
            )
        ranks = load_tiktoken_bpe(str(path))
        return tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
            special_tokens={EOT: 50256}, explicit_n_vocab=50257,
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises ValueError for unknown names, network errors otherwise
        raise UserError(
            f"tokenizer {name!r} is unavailable offline ({type(e).__name__}: {e}); "
            "'gpt2' is shipped with the package"
        ) from e


def eot_id(enc: tiktoken.Encoding) -> int:
    return enc.eot_token


# ---------------------------------------------------------------- one interface for every stage


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


class Tokenizer:
    """What every stage needs from a tokenizer; `fingerprint` names the vocabulary (ids -> tokens)."""

    kind: str
    name: str
    vocab_size: int
    eot_id: int
    special_ids: frozenset[int]

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`; special-token text becomes special ids only when `special`."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str], *, special: bool = False) -> list[list[int]]:
        return [self.encode(t, special=special) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (b"" for special tokens and ids outside the vocabulary)."""
        raise NotImplementedError

    def special_text(self, token: int) -> str:
        """The text of a special token (shown as is on the site)."""
        raise NotImplementedError

    def chat(self, messages: list[dict[str, str]]) -> str:
        """A conversation rendered as the model sees it (its chat template; plain turns if none)."""
        return "".join(f"{str(m.get('role', 'user')).capitalize()}: {m.get('content', '')}\n\n"
                       for m in messages)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the kind, the token of every id, and the end-of-text id."""
        toks = [self.special_text(i) if i in self.special_ids else self.token_bytes(i).hex()
                for i in range(self.vocab_size)]
        return _sha256_json({"kind": self.kind, "tokens": toks, "eot": self.eot_id})

    @property
    def dtype(self) -> str:
        """The narrowest unsigned dtype holding every id: uint16 below 65,536 ids, else uint32."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    def describe(self) -> dict[str, Any]:
        """What meta.json records about the tokenizer (`tokenizer_info`; enough to rebuild it)."""
        out = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
               "eot_id": self.eot_id, "fingerprint": self.fingerprint}
        for k in ("path", "revision"):
            if getattr(self, k, None):
                out[k] = getattr(self, k)
        return out


class TiktokenTokenizer(Tokenizer):
    """GPT-2 BPE (our GPT's tokenizer): the ids tiktoken's "gpt2" encoding gives."""

    kind = "tiktoken"

    def __init__(self, name: str = "gpt2"):
        self.enc = get_encoding(name)
        self.name = name
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token
        self._special = {self.enc.encode_single_token(t): t for t in self.enc.special_tokens_set}
        self.special_ids = frozenset(self._special)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return self.enc.encode(text, allowed_special="all") if special else self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], *, special: bool = False) -> list[list[int]]:
        if special:
            return self.enc.encode_batch(texts, allowed_special="all")
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self, token: int) -> bytes:
        if token in self._special or not 0 <= token < self.vocab_size:
            return b""
        return self.enc.decode_single_token_bytes(token)

    def special_text(self, token: int) -> str:
        return self._special.get(token, "")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (byte-level BPE token strings), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (byte-level BPE or sentencepiece-style): a loaded
    `PreTrainedTokenizerBase`, or a local folder / cached hub name loaded without network."""

    kind = "hf"

    def __init__(self, source: Any, name: str | None = None, revision: str | None = None):
        self.revision = revision
        if isinstance(source, (str, os.PathLike)):
            from transformers import AutoTokenizer

            self.path = str(source)
            try:
                self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True, revision=revision)
            except Exception as e:
                raise UserError(f"could not load a Hugging Face tokenizer from {self.path}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        else:
            self.tok, self.path = source, str(source.name_or_path)
        self.name = name or Path(self.path).name
        self.vocab_size = len(self.tok)
        self.special_ids = frozenset(int(i) for i in self.tok.all_special_ids) | frozenset(
            int(i) for i, t in self.tok.added_tokens_decoder.items() if t.special)
        self._strings = self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        self._style = self._decoder_style()
        self.eot_id = self._eot()

    def _decoder_style(self) -> str:
        """`bytelevel` (GPT-2/Llama-3/SmolLM2), `sentencepiece` (▁ for spaces, <0xNN> bytes) or `text`."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()).get("decoder") if backend is not None else None
        text = json.dumps(spec or {})
        if '"ByteLevel"' in text:
            return "bytelevel"
        if "\u2581" in text or '"Metaspace"' in text or '"ByteFallback"' in text:
            return "sentencepiece"
        return "text"

    def _eot(self) -> int:
        vocab = self.tok.get_vocab()
        for t in ("<|endoftext|>", "<|end_of_text|>", "</s>"):
            if t in vocab:
                return int(vocab[t])
        for i in (self.tok.eos_token_id, self.tok.bos_token_id):
            if i is not None:
                return int(i)
        raise UserError(f"tokenizer {self.path} has no end-of-text, eos or bos token to put between "
                        "documents")

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])

    def encode_batch(self, texts: list[str], *, special: bool = False) -> list[list[int]]:
        if not texts:
            return []
        out = self.tok(texts, add_special_tokens=False, split_special_tokens=not special)["input_ids"]
        return [list(x) for x in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def token_bytes(self, token: int) -> bytes:
        if token in self.special_ids or not 0 <= token < self.vocab_size:
            return b""
        s = self._strings[token]
        if s is None:
            return b""
        if self._style == "bytelevel":
            table = _byte_decoder()
            if all(c in table for c in s):
                return bytes(table[c] for c in s)
            return s.encode("utf-8")  # an added (non-special) token stored as plain text
        if self._style == "sentencepiece":
            m = _BYTE_TOKEN.match(s)
            if m:
                return bytes([int(m.group(1), 16)])
            return s.replace("\u2581", " ").encode("utf-8")
        return self.tok.decode([token]).encode("utf-8")

    def special_text(self, token: int) -> str:
        return self._strings[token] if token in self.special_ids else ""

    def chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tok, "chat_template", None):
            return super().chat(messages)
        return self.tok.apply_chat_template(messages, tokenize=False)


def load_tokenizer(sc: Any, data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a subject (transformer.subject_config.SubjectConfig): GPT-2 for `gpt`, the
    model's own (from its local folder) for `hf`."""
    if sc.kind == "gpt":
        return TiktokenTokenizer("gpt2")
    from transformer.hf_load import load_hf_tokenizer  # folder, embedded model, or cache / hub

    return HFTokenizer(load_hf_tokenizer(sc, data_dir), name=subject_slug(sc), revision=sc.revision)


def subject_slug(sc: Any) -> str:
    """A folder-safe name for an `hf` subject's tokenizer (`HuggingFaceTB--SmolLM2-135M`)."""
    if sc.embedded:
        raw = str(sc.embedded)
    else:
        model = str(sc.model).rstrip("/")
        raw = Path(model).name if Path(os.path.expanduser(model)).is_dir() else model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw.replace("/", "--")).strip("-.") or "hf"


def tokenizer_from_record(rec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a meta.json's `tokenizer_info` describes (for the site), fingerprint-checked."""
    if rec.get("kind") == "hf":
        tok: Tokenizer = HFTokenizer(rec["path"], name=rec.get("name"), revision=rec.get("revision"))
    else:
        tok = TiktokenTokenizer(str(rec.get("name") or "gpt2"))
    want = rec.get("fingerprint")
    if want and tok.fingerprint != want:
        raise UserError(f"tokenizer {tok.name} ({rec.get('path', '')}) has fingerprint "
                        f"{tok.fingerprint[:12]}, "
                        f"but the tokens were prepared with {str(want)[:12]}")
    return tok
