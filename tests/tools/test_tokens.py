"""Token display: incremental UTF-8 across a window, visible whitespace, special tokens."""

from __future__ import annotations

import pytest

from tools.tokens import TokenText, visible


@pytest.fixture(scope="module")
def text() -> TokenText:
    return TokenText()


def test_split_character_shows_whole_on_completing_token(text):
    ids = text.enc.encode("日本語 🎉")
    # GPT-2 splits each of these characters over two tokens (the premise of this test)
    assert any(len(text.token_bytes(t)) and text.token_bytes(t).decode("utf-8", "replace").count("�")
               for t in ids)
    strs = text.strs(ids)
    assert "".join(strs) == "日本語 🎉"
    assert "�" not in "".join(strs)
    assert [s for s in strs if s] == ["日", "本", "語", " ", "🎉"]  # the space decodes at once
    assert strs[0] == ""  # the first half of 日 shows nothing; 日 shows on the token completing it


def test_prefix_completes_a_character_started_before_the_window(text):
    ids = text.enc.encode("a日")
    assert len(ids) == 3  # "a", first bytes of 日, last byte
    assert text.strs(ids[2:]) == ["�"]  # alone, the last byte is invalid
    assert text.strs(ids[2:], prefix=ids[:2]) == ["日"]  # primed, it completes the character


def test_truly_invalid_bytes_are_replaced_once(text):
    lone = next(t for t in range(256) if text.token_bytes(t) == b"\xa5")
    ids = text.enc.encode("ok") + [lone] + text.enc.encode(" fine")
    strs = text.strs(ids)
    assert "".join(strs) == "ok� fine"


def test_pending_bytes_at_window_end_stay_hidden(text):
    ids = text.enc.encode("x日")
    strs = text.strs(ids[:-1])  # window cut inside 日: not invalid, just incomplete
    assert strs == ["x", ""]


def test_special_tokens_are_marked_and_reset_the_decoder(text):
    eot = 50256
    half = text.enc.encode("日")[0]
    strs = text.strs([half, eot] + text.enc.encode("hi"))
    assert strs == ["�", "<|endoftext|>", "hi"]  # bytes cut off by the special token are invalid
    assert text.is_special(eot) and text.hex_bytes(eot) == "special"
    assert text.hex_bytes(text.enc.encode(" the")[0]) == "20 74 68 65"


def test_out_of_vocabulary_ids_do_not_crash(text):
    assert text.strs([50300]) == ["<|id 50300|>"]
    assert text.single(50300) == "<|id 50300|>"


def test_visible_whitespace_and_invisible_characters():
    assert visible(" a\nb\tc\r") == " a↵b→c␍"
    assert visible("\x00\x1b\x7f") == "␀␛␡"
    assert visible("zero\u200bwidth") == "zero<U+200B>width"
    assert visible("\u202eevil\u202c") == "<U+202E>evil<U+202C>"
    assert visible("\ufeff") == "<U+FEFF>"
    assert visible("שלום") == "שלום"  # RTL letters are text, kept; only controls are made visible
    assert visible("  leading") == "  leading"
