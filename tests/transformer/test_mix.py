"""data=mix and Hugging Face tokenizers in transformer.prepare: ratios, chat rendering, dtype, meta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.tokenizers import byte_level, wide
from tools.core.config import UserError, compose
from transformer import prepare
from transformer.data import open_tokens, token_dir
from transformer.tokenizer import HFTokenizer


def cfg_for(tmp_path: Path, *overrides: str):
    return compose([f"data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}",
                    f"data.cache_dir={tmp_path / 'hf'}", "data.num_proc=1", *overrides])


def corpus(tmp_path: Path, n_web: int = 40, n_chat: int = 40) -> Path:
    c = tmp_path / "corpus"
    (c / "web").mkdir(parents=True)
    for i in range(n_web):
        (c / "web" / f"w{i:03d}.txt").write_text(f"web page {i}: the quick brown fox.", encoding="utf-8")
    with open(c / "chat.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_chat):
            conv = [{"role": "user", "content": f"question {i}?"},
                    {"role": "assistant", "content": f"answer {i}."}]
            f.write(json.dumps({"id": i, "conversation": conv}) + "\n")
    return c


def mix_overrides(c: Path, web: float, chat: float) -> list[str]:
    return ["data=mix", "data.max_documents=40", "data.val_fraction=0.1", "data.test_fraction=0.1",
            f"data.sources=[{{name: web, files: '{c}/web/*.txt', ratio: {web}}},"
            f"{{name: chat, files: '{c}/chat.jsonl', ratio: {chat}}}]"]


def split_docs(ids: np.ndarray, eot: int) -> list[list[int]]:
    cuts = np.flatnonzero(ids == eot)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [ids[s:e].tolist() for s, e in zip(starts, cuts, strict=True)]


def test_mix_with_hf_tokenizer_renders_chat_and_keeps_ratios(tmp_path):
    c = corpus(tmp_path)
    tok_dir = byte_level(tmp_path / "tok")
    cfg = cfg_for(tmp_path, "subject=hf", f"subject.model={tok_dir}", *mix_overrides(c, 0.25, 0.75))
    prepare.run(cfg)
    folder = token_dir(cfg)
    assert folder.name == "mix--tok"  # an HF subject's tokens never share the GPT-2 folder
    meta = json.loads((folder / "meta.json").read_text())
    tok = HFTokenizer(tok_dir)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    assert meta["tokenizer_info"]["fingerprint"] == tok.fingerprint and meta["eot_id"] == tok.eot_id
    assert [m["documents"] for m in meta["mix"]] == [10, 30]
    assert sum(meta["documents"].values()) == 40 and set(meta["documents"]) == {"train", "val", "test"}
    assert meta["documents"]["val"] == 4 and meta["documents"]["test"] == 4
    assert meta["split"]["unit"] == "document"
    docs = []
    for split in ("train", "val", "test"):
        ids = np.asarray(open_tokens(folder, split, fingerprint=tok.fingerprint))
        assert len(ids) == meta["tokens"][split]
        assert sum(meta["tokens_by_source"][split].values()) == len(ids)
        docs += [tok.decode(d) for d in split_docs(ids, tok.eot_id)]
    chats = [d for d in docs if d.startswith("<|im_start|>user\nquestion")]
    assert len(chats) == 30 and len([d for d in docs if d.startswith("web page")]) == 10
    # the template's markers are single special ids, not spelled out
    im_start = tok.tok.convert_tokens_to_ids("<|im_start|>")
    assert all(np.asarray(d).size for d in docs)
    all_ids = np.concatenate([np.asarray(open_tokens(folder, s)) for s in ("train", "val", "test")])
    assert (all_ids == im_start).sum() == 60
    assert prepare.done(cfg)
    # the same documents, but another split, is another output
    assert not prepare.done(cfg_for(tmp_path, "subject=hf", f"subject.model={tok_dir}",
                                    *mix_overrides(c, 0.25, 0.75), "data.split_seed=1"))


def test_chat_prefix_puts_web_text_behind_the_template(tmp_path):
    c = corpus(tmp_path, n_web=10, n_chat=1)
    tok_dir = byte_level(tmp_path / "tok")
    cfg = cfg_for(tmp_path, "subject=hf", f"subject.model={tok_dir}", "subject.chat_prefix=true",
                  "data=local", f"data.files={c}/web/*.txt", "data.val_fraction=0.2")
    prepare.run(cfg)
    folder = token_dir(cfg)
    tok = HFTokenizer(tok_dir)
    docs = [tok.decode(d) for d in split_docs(np.asarray(open_tokens(folder, "train")), tok.eot_id)]
    assert len(docs) == 8
    assert all(d.startswith("<|im_start|>user\nweb page ") and d.endswith("<|im_end|>\n") for d in docs)
    assert json.loads((folder / "meta.json").read_text())["chat_prefix"] is True


def test_gpt2_mix_renders_plain_turns_and_keeps_the_gpt2_folder(tmp_path):
    c = corpus(tmp_path, n_web=6, n_chat=6)
    cfg = cfg_for(tmp_path, *mix_overrides(c, 0.5, 0.5))
    prepare.run(cfg)
    folder = tmp_path / "data" / "mix"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16"
    assert [m["documents"] for m in meta["mix"]] == [6, 6]  # capped by the sources, not max_documents
    text = "".join(open_tokens(folder, s).tobytes().hex() for s in ("train",))
    assert text  # non-empty train split


def test_wide_vocabulary_writes_uint32(tmp_path):
    c = tmp_path / "c"
    c.mkdir()
    for i in range(5):
        (c / f"{i}.txt").write_text(f"plain text zq65999 and zq{i}", encoding="utf-8")
    tok_dir = wide(tmp_path / "tok")
    cfg = cfg_for(tmp_path, "subject=hf", f"subject.model={tok_dir}", "data=local",
                  f"data.files={c}/*.txt", "data.val_fraction=0.2")
    prepare.run(cfg)
    folder = token_dir(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    tok = HFTokenizer(tok_dir)
    assert tok.vocab_size > 65536 and meta["dtype"] == "uint32" and meta["vocab_size"] == tok.vocab_size
    ids = open_tokens(folder, "train")
    assert ids.dtype == np.uint32 and (folder / "train.bin").stat().st_size == 4 * meta["tokens"]["train"]
    big = tok.tok.convert_tokens_to_ids("zq65999")
    assert big > 65535 and (np.asarray(ids) == big).sum() == 4  # ids above uint16 survive
    assert prepare.done(cfg)


def test_tokens_from_another_tokenizer_are_a_named_error(tmp_path):
    c = corpus(tmp_path, n_web=6, n_chat=0)
    cfg = cfg_for(tmp_path, "data=local", f"data.files={c}/web/*.txt", "data.val_fraction=0.2")
    prepare.run(cfg)
    other = HFTokenizer(byte_level(tmp_path / "tok"))
    with pytest.raises(UserError, match=r"prepared with tokenizer 'gpt2' .* not the subject's"):
        open_tokens(tmp_path / "data" / "local", "train", fingerprint=other.fingerprint)


@pytest.mark.parametrize("sources, message", [
    ("[]", "data.sources` is empty"),
    ("[{name: a, ratio: 1}]", "exactly one of `path`"),
    ("[{name: a, files: x, ratio: 0}]", "ratio`=0"),
    ("[{name: a, files: x}, {name: a, files: y}]", "names must differ"),
])
def test_bad_sources_name_the_key(tmp_path, sources, message):
    with pytest.raises(UserError, match=message):
        prepare.run(cfg_for(tmp_path, "data=mix", f"data.sources={sources}"))


def test_chat_field_must_hold_turns(tmp_path):
    c = tmp_path / "c"
    c.mkdir()
    (c / "a.jsonl").write_text('{"messages": "not json"}\n{"messages": "x"}\n')
    with pytest.raises(UserError, match="chat field holds text that is not JSON"):
        prepare.run(cfg_for(tmp_path, "data=mix", f"data.sources=[{{name: a, files: '{c}/a.jsonl'}}]"))
