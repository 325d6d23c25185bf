"""transformer.prepare: round trip through train.bin / val.bin, every source format, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools.core.config import UserError, compose
from transformer import prepare
from transformer.tokenizer import get_encoding

EOT = 50256


def cfg_for(tmp_path: Path, *overrides: str):
    return compose([f"data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}",
                    f"data.cache_dir={tmp_path / 'hf'}", "data.num_proc=1", *overrides])


def docs_of(path: Path) -> list[str]:
    """Decode a .bin back into its documents (split at the end-of-text token)."""
    ids = np.fromfile(path, dtype=np.uint16)
    assert len(ids) and ids[-1] == EOT
    cuts = np.flatnonzero(ids == EOT)
    enc = get_encoding("gpt2")
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [enc.decode(ids[s:e].tolist()) for s, e in zip(starts, cuts, strict=True)]


def write_docs(folder: Path, docs: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")


DOCS = {
    "a.txt": "First document.\nIt has two lines.\n",
    "b.txt": "Second: naïve café, 日本語 🎉 and <|endoftext|> as plain text.",
    "c.txt": "Third document\n\nwith a blank line.",
    "d.txt": "Fourth, the held-out one.",
}


def test_round_trip_txt_with_val_files(tmp_path):
    write_docs(tmp_path / "corpus", DOCS)
    cfg = cfg_for(tmp_path, "data=local", f"data.files={tmp_path}/corpus/*.txt", "data.name=mini",
                  "data.val_files=[d.txt]")
    out = prepare.run(cfg)
    folder = tmp_path / "data" / "mini"
    assert docs_of(folder / "train.bin") == [DOCS["a.txt"], DOCS["b.txt"], DOCS["c.txt"]]
    assert docs_of(folder / "val.bin") == [DOCS["d.txt"]]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == "monosemantic.tokens/1" and meta["tokenizer"] == "gpt2"
    assert meta["vocab_size"] == 50257 and meta["eot_id"] == EOT and meta["dtype"] == "uint16"
    assert meta["documents"] == {"train": 3, "val": 1} and meta["replaced_bytes"] == 0
    ids = np.fromfile(folder / "train.bin", dtype=np.uint16)
    assert meta["tokens"] == {"train": len(ids), "val": len(np.fromfile(folder / "val.bin", dtype=np.uint16))}
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    assert meta["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)
    assert out["unigram_entropy_nats"] == pytest.approx(meta["unigram_entropy_nats"], abs=1e-5)
    assert prepare.done(cfg)
    assert not prepare.done(cfg_for(tmp_path, "data=local", f"data.files={tmp_path}/corpus/*.txt",
                                    "data.name=mini", "data.val_files=[c.txt]"))
    assert not list(folder.glob(".*tmp*"))


def test_shakespeare_holds_out_whole_plays(tmp_path):
    cfg = cfg_for(tmp_path, "data.num_proc=2")
    out = prepare.run(cfg)
    folder = tmp_path / "data" / "shakespeare"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["documents"] == {"train": 34, "val": 4}
    val = docs_of(folder / "val.bin")
    assert sorted(d.splitlines()[0] for d in val) == ["# Macbeth", "# Richard II", "# The Tempest",
                                                        "# Twelfth Night"]
    src = Path(prepare.SHAKESPEARE)
    assert val[0] == (src / "comedies--twelfth-night.md").read_text(encoding="utf-8")  # whole play, verbatim
    train = docs_of(folder / "train.bin")
    train_titles = {d.splitlines()[0] for d in train}
    assert len(train_titles) == 34 and "# Hamlet" in train_titles
    assert not train_titles & {d.splitlines()[0] for d in val}
    assert 1_000_000 < out["train_tokens"] and 50_000 < out["val_tokens"] < out["train_tokens"]
    assert 4.0 < meta["unigram_entropy_nats"] < 9.0


def test_jsonl_and_parquet_with_text_field_and_parallel_equals_serial(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "body": f"document number {i}: " + "word " * (i % 7)} for i in range(30)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "part1.jsonl", "w") as f:
        for r in rows[:20]:
            f.write(json.dumps(r) + "\n")
    pq.write_table(pa.Table.from_pylist(rows[20:]), corpus / "part2.parquet")
    base = ["data=local", f"data.files='{corpus}/*.jsonl,{corpus}/*.parquet'", "data.text_field=body",
            "data.val_fraction=0.1"]
    prepare.run(cfg_for(tmp_path, *base, "data.name=serial", "data.batch_size=3"))
    prepare.run(cfg_for(tmp_path, *base, "data.name=par", "data.num_proc=2"))
    d = tmp_path / "data"
    for split in ("train", "val"):
        assert (d / "serial" / f"{split}.bin").read_bytes() == (d / "par" / f"{split}.bin").read_bytes()
    got = docs_of(d / "serial" / "train.bin") + docs_of(d / "serial" / "val.bin")
    assert sorted(got) == sorted(r["body"] for r in rows)
    assert json.loads((d / "serial" / "meta.json").read_text())["documents"] == {"train": 27, "val": 3}


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"good text \xff\xfe here")
    (corpus / "b.txt").write_bytes(b"caf\xc3 ok")  # a truncated 2-byte sequence
    (corpus / "c.jsonl").write_bytes(b'{"text": "json \x80 bad"}\n{"text": "clean"}\n')
    cfg = cfg_for(tmp_path, "data=local", f"data.files={corpus}/*", "data.val_files=[b.txt]")
    out = prepare.run(cfg)
    assert out["replaced_bytes"] == 2 + 1 + 1
    train = docs_of(tmp_path / "data" / "local" / "train.bin")
    assert "good text \ufffd\ufffd here" in train and "json \ufffd bad" in train and "clean" in train
    assert docs_of(tmp_path / "data" / "local" / "val.bin") == ["caf\ufffd ok"]


@pytest.mark.parametrize("setup, overrides, message", [
    (None, ["data.files={c}/nothing-*.txt"], "no files match"),
    ({"empty.txt": ""}, [], r"corpus file .*empty.txt is empty"),
    ({"a.txt": "  \n ", "b.txt": "\n"}, [], "holds no text"),
    ({"a.jsonl": '{"body": "x"}\n{"body": "y"}\n'}, ["data.text_field=text"],
     r"`data.text_field`='text' not found in .*a.jsonl: columns are \['body'\]"),
    ({"a.csv": "x"}, [], "unsupported extension '.csv'"),
    ({"a.txt": "one document only"}, [], "need at least 2"),
    ({"a.txt": "x", "b.txt": "y"}, ["data.val_files=[zzz*]"], "matches none of the 2 corpus files"),
    ({"a.jsonl": '{"text": "x"\n'}, [], r"could not read json corpus .*a.jsonl"),
])
def test_bad_inputs_fail_clearly_and_leave_no_complete_output(tmp_path, setup, overrides, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_docs(corpus, setup or {})
    # a previous good run under the same name must not keep looking complete after a failed one
    write_docs(tmp_path / "ok", {"x.txt": "some text", "y.txt": "more text"})
    good = cfg_for(tmp_path, "data=local", f"data.files={tmp_path}/ok/*.txt")
    prepare.run(good)
    assert prepare.done(good)
    files = next((o for o in overrides if o.startswith("data.files=")), f"data.files={corpus}/*")
    rest = [o for o in overrides if not o.startswith("data.files=")]
    cfg = cfg_for(tmp_path, "data=local", files.format(c=corpus), *rest, "overwrite=true")
    with pytest.raises(UserError, match=message):
        prepare.run(cfg)
    assert not (tmp_path / "data" / "local" / "meta.json").exists()
    assert not prepare.done(good)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match="data.bogus"):
        prepare.run(cfg_for(tmp_path, "+data.bogus=1"))
    with pytest.raises(UserError, match="data.source"):
        prepare.run(cfg_for(tmp_path, "data.source=ftp"))
    with pytest.raises(UserError, match="data.files"):
        prepare.run(cfg_for(tmp_path, "data=local"))


def test_cli_exit_status_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "transformer.prepare", "data=local",
                        f"data.files={tmp_path}/none/*.txt", f"data_dir={tmp_path}/data",
                        f"run_dir={tmp_path}/run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error: config `data.files`=" in r.stderr and "no files match" in r.stderr
    assert "Traceback" not in r.stderr
