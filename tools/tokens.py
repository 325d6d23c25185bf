"""Token text for display: the bytes of each token decoded across a window, whitespace made visible.

Byte-level BPE (GPT-2, Llama 3, SmolLM2) splits many multi-byte UTF-8 characters over two or three
tokens, so decoding each token alone shows "�" (the fault of sae_vis' and the seed's pages). Here a
window is decoded with one incremental UTF-8 decoder: a token that ends mid-character shows "" and
the token that completes it shows the whole character; "�" appears only for bytes that are truly
invalid. The decoder is primed with the bytes of the tokens just before the window, so a character
that starts before the window still shows whole on the token that completes it."""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformer.tokenizer import Tokenizer

# UTF-8 characters are at most 4 bytes, so at most 3 pending bytes can come from before a window;
# byte-level tokens hold at least one byte each, so 3 tokens of prefix suffice.
PREFIX_TOKENS = 3

# Characters that are invisible or reorder text around them: shown as a visible code instead.
_INVISIBLE = {
    0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x200B, 0x200C, 0x200D, 0x200E,
    0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0x2066,
    0x2067, 0x2068, 0x2069, 0x206A, 0x206B, 0x206C, 0x206D, 0x206E, 0x206F, 0x3164, 0xFEFF, 0xFFA0,
}
_VISIBLE = {"\n": "↵", "\t": "→", "\r": "␍"}


_SPECIAL_CHARS = re.compile(
    "[\x00-\x1f\x7f-\x9f\U000e0000-\U000e007f" + "".join(chr(c) for c in sorted(_INVISIBLE)) + "]"
)


@functools.lru_cache(maxsize=1 << 16)
def visible(s: str) -> str:
    """Display form of token text: newline ↵, tab →, CR ␍, other C0/C1 controls as control pictures
    or <U+XXXX>, zero-width and bidi-control characters as <U+XXXX>; spaces are kept as spaces
    (pages render them with `white-space: pre`)."""
    if not _SPECIAL_CHARS.search(s):  # the common case: nothing to replace
        return s
    out = []
    for ch in s:
        o = ord(ch)
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif o < 0x20:
            out.append(chr(0x2400 + o))  # ␀ .. ␟
        elif o == 0x7F:
            out.append("␡")
        elif 0x80 <= o < 0xA0 or o in _INVISIBLE or 0xE0000 <= o <= 0xE007F:
            out.append(f"<U+{o:04X}>")
        else:
            out.append(ch)
    return "".join(out)


class TokenText:
    """Token ids -> display strings for one tokenizer (`transformer.tokenizer.Tokenizer`; GPT-2 by
    default, or an encoding name)."""

    def __init__(self, tokenizer: Tokenizer | str = "gpt2"):
        from transformer.tokenizer import TiktokenTokenizer

        self.tok = TiktokenTokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.special = {i: self.tok.special_text(i) for i in self.tok.special_ids}
        self.n_vocab = self.tok.vocab_size
        self.enc = getattr(self.tok, "enc", None)  # the tiktoken Encoding, for GPT-2

    def is_special(self, token: int) -> bool:
        return token in self.special

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one instance per run; the cache is the point)
    def token_bytes(self, token: int) -> bytes:
        """The token's bytes; special tokens and ids outside the vocabulary have none."""
        if token in self.special or not 0 <= token < self.n_vocab:
            return b""
        return self.tok.token_bytes(token)

    def single(self, token: int) -> str:
        """One token on its own (logit tables): invalid or partial UTF-8 shows as "�"."""
        if token in self.special:
            return self.special[token]
        if not 0 <= token < self.n_vocab:
            return f"<|id {token}|>"
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def strs(self, ids: Sequence[int], prefix: Sequence[int] = ()) -> list[str]:
        """Text of each token of a window, decoded incrementally (see the module docstring).

        `prefix`: the tokens just before the window (only the last PREFIX_TOKENS are used); their
        text is not returned. Bytes still pending at the end of the window stay undisplayed (they
        are completed by a token outside it), so "".join(result) is the window's decodable text.
        """
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for t in list(prefix)[-PREFIX_TOKENS:]:
            if t in self.special:
                dec.reset()
            else:
                dec.decode(self.token_bytes(int(t)))
        out: list[str] = []
        for t in ids:
            t = int(t)
            if t in self.special or not 0 <= t < self.n_vocab:
                pending = dec.decode(b"", final=True)  # bytes cut off by a special token are invalid
                if pending and out:
                    out[-1] += pending
                dec.reset()
                out.append(self.single(t))
            else:
                out.append(dec.decode(self.token_bytes(t)))
        return out

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def hex_bytes(self, token: int) -> str:
        """Bytes as hex for tooltips ("special" for special tokens)."""
        if token in self.special:
            return "special"
        return " ".join(f"{b:02x}" for b in self.token_bytes(token))
