"""The Tokenizer interface on real Hugging Face tokenizers built offline (byte-level BPE and
sentencepiece-style with byte fallback), GPT-2 through the same interface, and SmolLM2 (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tokenizers import byte_level, sentencepiece_style
from tools.core.config import UserError
from tools.tokens import TokenText
from transformer.subject_config import SubjectConfig
from transformer.tokenizer import HFTokenizer, TiktokenTokenizer, load_tokenizer, subject_slug

TEXT = "Hello world! naïve café 日本語 🎉\n\tdef main():"


@pytest.fixture(scope="module")
def bl(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer(byte_level(tmp_path_factory.mktemp("tok") / "bl"))


def test_byte_level_bytes_round_trip_and_specials(bl):
    ids = bl.encode(TEXT)
    assert b"".join(bl.token_bytes(i) for i in ids) == TEXT.encode("utf-8")
    assert bl.decode(ids) == TEXT
    assert any(len(bl.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # split chars
    end = bl.tok.convert_tokens_to_ids("<|im_end|>")
    assert bl.eot_id == bl.tok.convert_tokens_to_ids("<|endoftext|>")
    assert end in bl.special_ids and bl.token_bytes(end) == b"" and bl.special_text(end) == "<|im_end|>"
    assert bl.encode("<|im_end|>", special=True) == [end]
    assert end not in bl.encode("<|im_end|>")  # corpus text never becomes a special token
    assert bl.dtype == "uint16" and bl.vocab_size == len(bl.tok)


def test_site_text_shows_split_characters_whole(bl):
    text = TokenText(bl)
    ids = bl.encode("日本語 🎉")
    strs = text.strs(ids)
    assert "".join(strs) == "日本語 🎉" and "" in strs and "\ufffd" not in "".join(strs)
    end = bl.tok.convert_tokens_to_ids("<|im_end|>")
    assert text.single(end) == "<|im_end|>" and text.hex_bytes(end) == "special"


def test_chat_uses_the_template(bl):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert bl.chat(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    gpt = TiktokenTokenizer()
    assert gpt.chat(msgs) == "User: hi\n\nAssistant: yo\n\n"  # no template: plain turns


def test_sentencepiece_style_bytes(tmp_path):
    sp = HFTokenizer(sentencepiece_style(tmp_path / "sp"))
    ids = sp.encode("hello cat é")
    toks = sp.tok.convert_ids_to_tokens(ids)
    assert toks == ["\u2581hello", "\u2581cat", "\u2581", "<0xC3>", "<0xA9>"]
    assert [sp.token_bytes(i) for i in ids] == [b" hello", b" cat", b" ", b"\xc3", b"\xa9"]
    assert sp.eot_id == sp.tok.convert_tokens_to_ids("</s>")
    assert TokenText(sp).strs(ids) == [" hello", " cat", " ", "", "é"]


def test_fingerprint_names_the_vocabulary(tmp_path, bl):
    again = HFTokenizer(byte_level(tmp_path / "again"))
    other = HFTokenizer(byte_level(tmp_path / "other", vocab_size=300))
    assert again.fingerprint == bl.fingerprint != other.fingerprint
    assert TiktokenTokenizer().fingerprint != bl.fingerprint
    assert len(bl.fingerprint) == 64


def test_load_tokenizer_by_subject(tmp_path):
    gpt = load_tokenizer(SubjectConfig(), tmp_path)
    assert gpt.encode("Hello world") == [15496, 995] and gpt.eot_id == 50256 and gpt.vocab_size == 50257
    folder = byte_level(tmp_path / "my-model")
    hf = load_tokenizer(SubjectConfig(kind="hf", model=str(folder)), tmp_path)
    assert hf.name == "my-model" and hf.encode("the cat") == HFTokenizer(folder).encode("the cat")
    assert subject_slug(SubjectConfig(kind="hf", model="meta-llama/Llama-3.1-8B-Instruct")) == \
        "meta-llama--Llama-3.1-8B-Instruct"
    with pytest.raises(UserError, match="could not load a Hugging Face tokenizer"):
        HFTokenizer(tmp_path)


def test_uncached_hub_tokenizer_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="'no-such-org/no-such-model' is not a local folder, not in the"):
        load_tokenizer(SubjectConfig(kind="hf", model="no-such-org/no-such-model"), tmp_path)


SMOLLM2 = SubjectConfig(kind="hf", embedded="smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_known_ids(smollm2_data_dir):
    from transformer.hf_load import converted_dir

    folder = converted_dir("smollm2-135m-instruct", smollm2_data_dir)
    tok = load_tokenizer(SMOLLM2, smollm2_data_dir)
    assert tok.name == "smollm2-135m-instruct" and Path(tok.path) == folder
    assert tok.fingerprint == HFTokenizer(folder).fingerprint
    assert tok.vocab_size == 49152 and tok.dtype == "uint16" and tok._style == "bytelevel"
    vocab = tok.tok.get_vocab()
    assert (vocab["<|endoftext|>"], vocab["<|im_start|>"], vocab["<|im_end|>"]) == (0, 1, 2)
    assert tok.eot_id == 0
    ids = tok.encode("Hello world! The capital of France is Paris.")
    assert ids == [19556, 905, 17, 378, 3575, 282, 4649, 314, 7042, 30]
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        "Hello world! The capital of France is Paris.", add_special_tokens=False).ids == ids
    assert b"".join(tok.token_bytes(i) for i in tok.encode(TEXT)) == TEXT.encode("utf-8")
    assert tok.encode(tok.chat([{"role": "user", "content": "Hi"}]), special=True)[:2] == [1, 9690]


@pytest.mark.slow
def test_smollm2_prepares_chat_with_its_template(tmp_path, smollm2_data_dir):
    import json

    import numpy as np

    from tools.core.config import compose
    from transformer import prepare
    from transformer.data import open_tokens, token_dir
    from transformer.hf_load import converted_dir

    folder = converted_dir("smollm2-135m-instruct", smollm2_data_dir)

    (tmp_path / "web").mkdir()
    for i in range(6):
        (tmp_path / "web" / f"{i}.txt").write_text(f"The capital of France is Paris. ({i})", encoding="utf-8")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": conv}) + "\n" for _ in range(6)))
    cfg = compose([f"data_dir={tmp_path / 'data'}", "data.num_proc=2", f"data.cache_dir={tmp_path / 'hf'}",
                   "subject=hf", f"subject.model={folder}", "data=mix", "data.val_fraction=0.2",
                   f"data.sources=[{{name: web, files: '{tmp_path}/web/*.txt'}},"
                   f"{{name: chat, files: '{tmp_path}/chat.jsonl'}}]"])
    prepare.run(cfg)
    out = token_dir(cfg)
    meta = json.loads((out / "meta.json").read_text())
    assert out.name == "mix--smollm2-135m-instruct" and meta["vocab_size"] == 49152
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0
    ids = np.concatenate([np.asarray(open_tokens(out, s)) for s in ("train", "val", "test")]).tolist()
    tok = HFTokenizer(folder)
    # each conversation: the template's system turn first (<|im_start|> = 1, "system" = 9690)
    assert ids.count(1) == 6 * 3 and ids.count(0) == 12
    assert tok.decode(ids).count("<|im_start|>assistant\nHello!<|im_end|>") == 6
    assert tok.decode(ids).count("The capital of France is Paris.") == 6
    i = ids.index(1)
    assert ids[i:i + 2] == [1, 9690]
