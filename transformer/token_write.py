"""Tokenize a split (in parallel workers) and stream its ids into `<split>.bin` (transformer.prepare).

Rows carry `text` and, from `data=mix`, `messages` (a conversation as JSON) and `source`. A
conversation is rendered with the subject's chat template; with `chat_prefix`, plain text is put
behind it as one user turn. Rendered chat may hold the template's special tokens (encoded as
such); plain corpus text never becomes a special token. The end-of-text id follows each document.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tools.core.files import atomic_path
from transformer.tokenizer import Tokenizer

Spec = tuple[str, str, str | None, str | None]


@functools.lru_cache(maxsize=4)
def _worker_tokenizer(spec: Spec) -> Tokenizer:
    """A tokenizer rebuilt from (kind, name, path, revision) once per worker process."""
    from transformer.tokenizer import HFTokenizer, TiktokenTokenizer

    kind, name, path, revision = spec
    return HFTokenizer(path, name=name, revision=revision) if kind == "hf" else TiktokenTokenizer(name)


def spec_of(tok: Tokenizer) -> Spec:
    return tok.kind, tok.name, getattr(tok, "path", None), getattr(tok, "revision", None)


def render(tok: Tokenizer, text: str | None, messages: str | None, chat_prefix: bool) -> tuple[str, bool]:
    """(document text, whether it holds template special tokens)."""
    if messages:
        return tok.chat(json.loads(messages)), True
    if chat_prefix:
        return tok.chat([{"role": "user", "content": text or ""}]), True
    return text or "", False


def _tokenize(batch: dict[str, list], spec: Spec, chat_prefix: bool) -> dict[str, list]:
    tok = _worker_tokenizer(spec)
    n = len(batch["text"])
    msgs = batch.get("messages") or [None] * n
    docs = [render(tok, t, m, chat_prefix) for t, m in zip(batch["text"], msgs, strict=True)]
    plain = [i for i, (_, chat) in enumerate(docs) if not chat]
    chat = [i for i, (_, c) in enumerate(docs) if c]
    ids: list[list[int]] = [[] for _ in range(n)]
    for idx, special in ((plain, False), (chat, True)):
        for i, x in zip(idx, tok.encode_batch([docs[i][0] for i in idx], special=special), strict=True):
            ids[i] = list(x) + [tok.eot_id]
    out = {"ids": ids, "len": [len(x) for x in ids]}
    if "source" in batch:
        out["source"] = batch["source"]
    return out


def _nonempty(batch: dict[str, list]) -> list[bool]:
    msgs = batch.get("messages") or [None] * len(batch["text"])
    return [bool((t and t.strip()) or m) for t, m in zip(batch["text"], msgs, strict=True)]


def tokenize_split(ds: Any, tok: Tokenizer, *, chat_prefix: bool, num_proc: int | None, batch_size: int,
                   split: str) -> Any:
    """Drop empty documents, then tokenize (columns ids, len[, source])."""
    ds = ds.filter(_nonempty, batched=True, batch_size=batch_size, desc=f"{split}: dropping empty documents")
    if len(ds) == 0:
        return ds
    procs = min(num_proc or os.cpu_count() or 1, len(ds))
    return ds.map(_tokenize, batched=True, batch_size=batch_size, num_proc=procs if procs > 1 else None,
                  remove_columns=ds.column_names,
                  fn_kwargs={"spec": spec_of(tok), "chat_prefix": chat_prefix},
                  desc=f"{split}: tokenizing")


def write_bin(ds: Any, path: Path, batch_size: int, desc: str, *, dtype: str = "uint16",
              vocab_size: int = 1 << 16) -> tuple[int, np.ndarray]:
    """Stream token ids into a memmap of `dtype` at a temporary name; returns (tokens, unigram counts)."""
    lengths = ds.select_columns(["len"]).iter(batch_size=65536)
    total = int(sum(int(np.asarray(b["len"]).sum()) for b in lengths))
    counts = np.zeros(vocab_size, dtype=np.int64)
    with atomic_path(path) as tmp:
        arr = np.memmap(tmp, dtype=dtype, mode="w+", shape=(max(total, 1),))
        pos = 0
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, mininterval=1.0) as bar:
            for batch in ds.select_columns(["ids"]).iter(batch_size=batch_size):
                flat = np.concatenate([np.asarray(x, dtype=dtype) for x in batch["ids"]])
                arr[pos:pos + len(flat)] = flat
                counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
                pos += len(flat)
                bar.update(len(flat))
        arr.flush()
        del arr
        assert pos == total, (pos, total)
    return total, counts


def tokens_by_source(ds: Any, names: list[str]) -> dict[str, int]:
    """Tokens each mix source contributed to a tokenized split."""
    if "source" not in ds.column_names:
        return {}
    src = np.asarray(ds["source"], dtype=np.int64)
    lens = np.asarray(ds["len"], dtype=np.int64)
    sums = np.bincount(src, weights=lens, minlength=len(names))
    return {n: int(s) for n, s in zip(names, sums, strict=True)}


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token frequency distribution (a model's loss floor without context)."""
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())
