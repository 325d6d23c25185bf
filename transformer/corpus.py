"""Loading a corpus from files: globs, text / JSON-lines / parquet, invalid UTF-8, held-out documents.

Used by `transformer.prepare` (one corpus) and `transformer.mix` (each local source of a mix).
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import os
from pathlib import Path
from typing import Any

from tools.core.config import UserError

TEXT_EXTS = (".txt", ".md", ".text")
JSON_EXTS = (".jsonl", ".json")
PARQUET_EXTS = (".parquet",)


def expand_files(pattern: str, key: str) -> list[str]:
    """The files matched by comma-separated globs (sorted, absolute); none is an error naming `key`."""
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


def load_files(files: list[str], tmp: Path, *, sample_by: str = "document", text_field: str = "text",
               cache_dir: str | None = None) -> tuple[Any, int]:
    """One Dataset with a `text` column from local files of any supported kind, + replaced bytes.

    `sample_by` splits text files into documents, `text_field` names the column of structured
    files, invalid UTF-8 is replaced (a JSON file through a clean copy under `tmp`)."""
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
    common = dict(split="train", cache_dir=cache_dir)
    if kinds["text"]:
        for f in kinds["text"]:
            replaced += _count_invalid_utf8(f)
        parts.append(datasets.load_dataset(
            "text", data_files=kinds["text"], sample_by=sample_by, encoding="utf-8",
            encoding_errors="replace", keep_linebreaks=True, **common))
    if kinds["json"]:
        clean = []
        for f in kinds["json"]:
            bad = _count_invalid_utf8(f)
            replaced += bad
            clean.append(_sanitize_copy(f, tmp) if bad else f)
        parts.append(with_field(load_builder("json", clean, common), text_field, kinds["json"]))
    if kinds["parquet"]:
        parts.append(with_field(load_builder("parquet", kinds["parquet"], common), text_field,
                                 kinds["parquet"]))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return ds, replaced


def load_builder(builder: str, files: list[str], common: dict) -> Any:
    """`datasets.load_dataset(builder, data_files=files)`; a parse error names the file."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, **common)
    except Exception as e:  # Arrow's parse errors carry the offending file in their message
        raise UserError(f"could not read {builder} corpus {files[0] if len(files) == 1 else files}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def with_field(ds: Any, text_field: str, files: list[str]) -> Any:
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


def split_by_files(files: list[str], val_globs: list[str]) -> tuple[list[str], list[str]]:
    """(train files, val files): val are those whose name matches one of `val_globs`."""
    val = [f for f in files if any(fnmatch.fnmatch(Path(f).name, g) for g in val_globs)]
    train = [f for f in files if f not in val]
    if not val:
        raise UserError(f"config `data.val_files`={val_globs}: matches none of the {len(files)} corpus files")
    if not train:
        raise UserError(f"config `data.val_files`={val_globs}: matches every corpus file, "
                        "none left to train on")
    return train, val


def hold_out(ds: Any, frac: float, seed: int, what: str) -> tuple[Any, Any, int]:
    """(rest, held-out, n held out): a seeded random `frac` of whole documents (at least one)."""
    if len(ds) < 2:
        raise UserError(f"corpus has {len(ds)} document(s): need at least 2 to hold one out for {what} "
                        "(or split it into several files / use data.sample_by=paragraph)")
    n = min(max(1, round(len(ds) * frac)), len(ds) - 1)
    parts = ds.train_test_split(test_size=n, seed=seed, shuffle=True)
    return parts["train"], parts["test"], n
