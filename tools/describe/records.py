"""`descriptions.jsonl`, an append-only log of one describe run: its one reader and its writers.

One line per finished unit (docs/formats.md). The describe stage appends whole lines, each flushed and
fsynced; a rerun finds the finished units, later lines winning. The site reads the same file while a
run may still be appending, so it skips what is not a whole record instead of refusing it. Reading
features.jsonl is `tools.features.records`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from tools.core.config import UserError

FILE = "descriptions.jsonl"


def read_records(path: Path, *, strict: bool = False) -> dict[int, dict[str, Any]]:
    """Records by unit index, later lines winning. `strict` (the stage's own log): a line that is not a
    record is a UserError; otherwise (a reader beside a running writer) it is skipped."""
    out: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[int(rec["index"])] = rec
            except (ValueError, KeyError, TypeError):
                if strict:
                    raise UserError(f"{path}:{lineno}: not a description record; move the file away or pass "
                                    "describe.overwrite=true") from None
                continue  # a line cut by an interrupted append: skip it, the rest still show
    return out


def load_records(path: Path) -> dict[int, dict[str, Any]]:
    """The stage's finished units by index; a partial last line (a crash mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"describe: dropping a partial last line of {path} (interrupted write)", flush=True)
        with open(path, "r+b") as f:
            f.truncate(end)
    return read_records(path, strict=True)


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
