"""`features.jsonl`, its one reader and one writer (docs/formats.md).

The file of a large SAE runs to gigabytes, so it is never held whole. The writer puts each record's
`index` first, so a reader can take `{"index": N` (and a leading `"density"`) from the start of a
line with a regular expression and parse only the lines it wants.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tools.core.config import UserError
from tools.core.files import atomic_path

FILE = "features.jsonl"
INDEX_PREFIX = re.compile(rb'^\s*\{\s*"index"\s*:\s*(\d+)\s*[,}]')
_DENSITY = re.compile(rb'"density"\s*:\s*(-?[0-9.eE+-]+)')


def features_path(directory: Path) -> Path:
    """`directory/features.jsonl`, or a UserError saying which stage writes it."""
    path = Path(directory) / FILE
    if not path.is_file():
        raise UserError(f"features not found: {path} (run `python -m tools.top_activations` with the same "
                        "run_dir and features.unit first)")
    return path


def _parse(line: bytes, where: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not valid JSON ({getattr(e, 'msg', e)}); rerun tools.top_activations") \
            from None
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


def scan_indices(path: Path, max_units: int | None = None) -> list[int]:
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


def iter_records(path: Path, wanted: set[int] | None = None, max_units: int | None = None,
                 check: Callable[[dict[str, Any]], None] | None = None) -> Iterator[dict[str, Any]]:
    """Parsed records in file order (of the units in `wanted`; other lines are skipped unparsed).
    `check(rec)` raising ValueError/TypeError/AttributeError becomes a UserError naming the line."""
    for where, line in _lines(path, max_units):
        if wanted is not None:
            m = INDEX_PREFIX.match(line)
            if m and int(m.group(1)) not in wanted:
                continue
        rec = _parse(line, where)
        if wanted is not None and rec["index"] not in wanted:
            continue
        if check is not None:
            try:
                check(rec)
            except (ValueError, AttributeError, TypeError) as e:
                raise UserError(f"{where} (unit {rec['index']}): {e}") from None
        yield rec


def alive_units(path: Path, indices: list[int]) -> list[int]:
    """Units of `indices` that fired in the scan (density > 0, or top exemplars when a line has no
    density), read from each line's start where possible."""
    wanted, alive = set(indices), []
    for where, line in _lines(path, None):
        m = INDEX_PREFIX.match(line)
        if not m or int(m.group(1)) not in wanted:
            continue
        d = _DENSITY.search(line[:400])
        fired = float(d.group(1)) > 0 if d is not None else bool(_parse(line, where).get("top"))
        if fired:
            alive.append(int(m.group(1)))
    return alive


def dumps(rec: dict[str, Any]) -> str:
    """One record as its line (without the newline): compact, UTF-8, no NaN."""
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@contextlib.contextmanager
def write_records(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Write features.jsonl atomically: yields `write(rec)` (records in index order, `index` first);
    the file appears under its name only when the block completes."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        def write(rec: dict[str, Any]) -> None:
            if next(iter(rec), None) != "index":
                raise ValueError("a features.jsonl record starts with its `index`")
            fh.write(dumps(rec) + "\n")

        yield write
