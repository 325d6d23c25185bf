"""`data=mix`: several corpora mixed by document ratio, as the reference mixes web text and chat.

Each source is a hub dataset or local files (.txt/.md, .jsonl/.json, .parquet). A source's rows
become either plain text (its `text_field`) or a conversation (a `messages` / `conversation`
field: a list of {role, content}), kept as JSON so every source has the same two string columns
(`text`, `messages`) and a `source` index. Conversations are rendered with the subject's chat
template at tokenization time (transformer.prepare), where the tokenizer is at hand.

Ratios are shares of documents: with N documents in all, source i contributes round(r_i N) of
them, drawn uniformly (seeded) from its rows. N is `data.max_documents`, lowered to what the
smallest source (relative to its ratio) can supply; meta.json records what each source gave.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tools.core.config import UserError
from transformer.config import MixSource

CHAT_FIELDS = ("messages", "conversation")


def _uniform(ds: Any, src: MixSource, files: list[str]) -> Any:
    """Rows -> {text, messages} strings (one of them None per row)."""
    cols = ds.column_names
    chat = src.chat_field or next((c for c in CHAT_FIELDS if c in cols), None)
    if src.chat_field and chat not in cols:
        raise UserError(f"source {src.name}: `chat_field`={chat!r} not found in {files[0]}: "
                        f"columns are {cols}")
    if chat is None and src.text_field not in cols:
        raise UserError(f"source {src.name}: neither `text_field`={src.text_field!r} nor a chat field "
                        f"({', '.join(CHAT_FIELDS)}) in {files[0]}: columns are {cols}")

    def convert(batch: dict[str, list]) -> dict[str, list]:
        n = len(batch[cols[0]])
        if chat is not None:
            msgs = [_messages(m, src.name) for m in batch[chat]]
            return {"text": [None] * n, "messages": msgs}
        return {"text": batch[src.text_field], "messages": [None] * n}

    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "messages": datasets.Value("string")})
    return ds.map(convert, batched=True, remove_columns=cols, features=features, desc=f"{src.name}: reading")


def _messages(m: Any, name: str) -> str | None:
    """A conversation as JSON [{role, content}] (JSON text or a list of mappings); None if empty."""
    if isinstance(m, str):
        try:
            m = json.loads(m)
        except json.JSONDecodeError as e:
            raise UserError(f"source {name}: a chat field holds text that is not JSON ({e})") from e
    if not m:
        return None
    if not isinstance(m, list) or not all(isinstance(t, dict) and "content" in t for t in m):
        raise UserError(f"source {name}: a chat field must be a list of {{role, content}}, "
                        f"got {str(m)[:80]!r}")
    return json.dumps([{"role": str(t.get("role") or "user"), "content": str(t["content"] or "")} for t in m],
                      ensure_ascii=False)


def load_source(src: MixSource, want: int | None, cache_dir: str | None, tmp: Path) -> tuple[Any, str]:
    """One source as a Dataset with `text` and `messages` columns; `want` caps streamed hub rows."""
    import datasets

    if src.files:
        from transformer.corpus import TEXT_EXTS, expand_files, load_builder, load_files

        files = expand_files(src.files, f"data.sources[{src.name}].files")
        text_files = [f for f in files if Path(f).suffix.lower() in TEXT_EXTS]
        if text_files and len(text_files) == len(files):
            ds, _ = load_files(files, tmp, sample_by=src.sample_by, cache_dir=cache_dir)
            return _uniform(ds, src, files), f"{src.name}: {len(files)} local files"
        if text_files:
            raise UserError(f"source {src.name}: mixes text and structured files; give them as two sources")
        builder = "parquet" if all(f.endswith(".parquet") for f in files) else "json"
        ds = load_builder(builder, files, dict(split="train", cache_dir=cache_dir))
        return _uniform(ds, src, files), f"{src.name}: {len(files)} local {builder} files"
    common = dict(name=src.subset, split=src.split, revision=src.revision)
    try:
        if src.streaming and want:
            stream = datasets.load_dataset(src.path, streaming=True, **common)
            ds = datasets.Dataset.from_list(list(stream.take(want)))
        else:
            ds = datasets.load_dataset(src.path, cache_dir=cache_dir, **common)
    except Exception as e:
        raise UserError(f"could not load hub dataset {src.path!r} for source {src.name}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return _uniform(ds, src, [f"hub dataset {src.path}"]), f"{src.name}: hub {src.path} split {src.split}"


def mix(sources: list[MixSource], max_documents: int | None, seed: int, cache_dir: str | None,
        tmp: Path) -> tuple[Any, str, list[dict[str, Any]]]:
    """The mixed corpus (columns text, messages, source), its description and per-source records."""
    import datasets

    total = sum(s.ratio for s in sources)
    shares = [s.ratio / total for s in sources]
    # streamed hub sources fetch only what the cap asks for (a little more, for empty rows)
    loaded = [load_source(s, int(max_documents * r * 1.1) + 1 if max_documents else None, cache_dir, tmp)
              for s, r in zip(sources, shares, strict=True)]
    sizes = [len(ds) for ds, _ in loaded]
    n = min(sz / r for sz, r in zip(sizes, shares, strict=True))
    if max_documents:
        n = min(n, max_documents)
    parts, records = [], []
    for i, ((ds, _desc), src, r) in enumerate(zip(loaded, sources, shares, strict=True)):
        k = min(len(ds), max(1, round(r * n)))
        picked = ds.shuffle(seed=seed + i).select(range(k))
        parts.append(picked.add_column("source", [i] * k))
        records.append({"name": src.name, "ratio": round(r, 6), "documents": k, "available": len(ds),
                        "kind": "hub" if src.path else "local", "from": src.path or src.files})
    ds = datasets.concatenate_datasets(parts)
    desc = "mix: " + ", ".join(f"{rec['name']} {rec['ratio']:g} ({rec['documents']} docs)" for rec in records)
    return ds, desc, records
