"""GPT-2 BPE from the shipped ranks file: published ids, EOT, and a tampered or missing file."""

from __future__ import annotations

import shutil

import pytest

from tools.core.config import UserError
from transformer.tokenizer import GPT2_RANKS, get_encoding


def test_known_gpt2_ids():
    enc = get_encoding("gpt2")
    # ids as published for GPT-2 (tiktoken "gpt2" / HF GPT2Tokenizer)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("Hello world! The quick brown fox.") == [15496, 995, 0, 383, 2068, 7586, 21831, 13]
    assert enc.encode(" the") == [262]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode_ordinary("<|endoftext|>") != [50256]  # corpus text never becomes EOT


def test_round_trip_unicode():
    enc = get_encoding("gpt2")
    text = "naïve café 日本語 🎉\n\tO Romeo, Romeo!"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_tampered_ranks_file_is_rejected(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    shutil.copy(GPT2_RANKS, bad)
    with open(bad, "ab") as f:
        f.write(b"\n")
    with pytest.raises(UserError, match=r"gpt2.tiktoken has sha256 [0-9a-f]{64}, expected"):
        get_encoding("gpt2", str(bad))


def test_missing_ranks_file(tmp_path):
    with pytest.raises(UserError, match="tokenizer ranks file not found"):
        get_encoding("gpt2", str(tmp_path / "nope.tiktoken"))


def test_unknown_encoding_names_itself():
    with pytest.raises(UserError, match="'no-such-encoding'"):
        get_encoding("no-such-encoding")
