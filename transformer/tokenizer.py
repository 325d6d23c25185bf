"""GPT-2 byte-pair encoding from the ranks file shipped in `transformer/assets/` (no network).

`gpt2.tiktoken` comes from the openai-whisper sdist (MIT, see assets/LICENSE.gpt2-tiktoken); its
ranks equal tiktoken's "gpt2" encoding. The file is checked against a pinned sha256 at load.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from transformer.config import UserError
from transformer.files import sha256_file

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
