"""Reading features.jsonl as a stream, and descriptions.jsonl as an append-only log.

features.jsonl of a large SAE runs to gigabytes, so it is never held whole: a first pass reads
only each line's leading `{"index": N` (the writer puts it first), and units are then parsed,
validated and described a chunk at a time, skipping the lines of units already described.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tools.core.config import UserError
from tools.describe.exemplars import check_example

INDEX_PREFIX = re.compile(rb'^\s*\{\s*"index"\s*:\s*(\d+)\s*[,}]')


def features_path(directory: Path) -> Path:
    path = directory / "features.jsonl"
    if not path.is_file():
        raise UserError(f"features not found: {path} (run `python -m tools.top_activations` with the same "
                        "run_dir and features.unit first)")
    return path


def _parse(line: bytes, where: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("index"), int) or isinstance(rec["index"], bool):
        raise UserError(f"{where}: expected an object with an integer `index`")
    return rec


def _lines(path: Path, max_units: int | None) -> Iterator[tuple[str, bytes]]:
    n = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if max_units is not None and n >= max_units:
                return
            if line.strip():
                n += 1
                yield f"{path}:{lineno}", line


def scan_indices(path: Path, max_units: int | None) -> list[int]:
    """Unit indices in file order (the first `max_units`), without parsing the exemplars."""
    indices = []
    for where, line in _lines(path, max_units):
        m = INDEX_PREFIX.match(line)
        indices.append(int(m.group(1)) if m else _parse(line, where)["index"])
    if not indices:
        raise UserError(f"{path} has no units")
    if len(set(indices)) != len(indices):
        raise UserError(f"{path}: a unit index appears on more than one line")
    return indices


def iter_units(path: Path, wanted: set[int], max_units: int | None) -> Iterator[dict[str, Any]]:
    """Parsed, validated records of the units in `wanted`; other lines are skipped unparsed."""
    for where, line in _lines(path, max_units):
        m = INDEX_PREFIX.match(line)
        if m and int(m.group(1)) not in wanted:
            continue
        rec = _parse(line, where)
        if rec["index"] not in wanted:
            continue
        try:
            for key in ("top", "random", "uniform"):
                for n, ex in enumerate(rec.get(key) or []):
                    check_example(ex, f"{key}[{n}]")
            for b, q in enumerate(rec.get("quantiles") or []):
                for n, ex in enumerate(q.get("examples") or []):
                    check_example(ex, f"quantiles[{b}].examples[{n}]")
        except (ValueError, AttributeError, TypeError) as e:
            raise UserError(f"{where} (unit {rec['index']}): {e}") from None
        yield rec


def load_records(path: Path) -> dict[int, dict[str, Any]]:
    """Finished units by index; a partial last line (a crash mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"describe: dropping a partial last line of {path} (interrupted write)", flush=True)
        with open(path, "r+b") as f:
            f.truncate(end)
    records: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records[int(rec["index"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{path}:{lineno}: not a description record; move the file away or pass "
                            "describe.overwrite=true") from None
    return records


def rewrite_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace the log atomically (used to drop failed units before retrying them)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RecordWriter:
    """Thread-safe appends of whole lines, each flushed and fsynced before it counts as done."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
