"""Read back what an offline W&B run logged, straight from its `run-<id>.wandb` file.

wandb >= 0.18 ships no reader for its transaction log, so tests parse it here: a 7-byte file
header (`:W&B`, magic 0xBEE1, version 0) followed by a LevelDB-style log (32 KiB blocks of
records with a 7-byte header: crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST), each
record a `wandb_internal_pb2.Record` protobuf.

    run = read_offline_run(tmp_path / "run")      # run_dir, its wandb/ folder, a run folder or file
    losses = [row["train/loss"] for row in run.history if "train/loss" in row]
    run.summary["val/loss"]
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FILE_HEADER = 7
_BLOCK = 32768
_REC_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path  # the .wandb file read
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per `run.log` step
    summary: dict[str, Any] = field(default_factory=dict)  # final summary (last value per key)
    config: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, Any]]:
        """(step, value) for every history row that has `key`."""
        return [(row.get("_step", i), row[key]) for i, row in enumerate(self.history) if key in row]


def find_run_file(path: str | Path) -> Path:
    """The newest `run-*.wandb` under `path` (a run_dir, a wandb/ folder, a run folder, or the file)."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file under {path}")
    return files[-1]


def _records(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError("not a W&B transaction log (bad header)")
    out: list[bytes] = []
    pos, pending = _FILE_HEADER, b""
    while pos + _REC_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _REC_HEADER:  # block trailer: zero padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:  # zero-filled tail of a file still being written
            break
        chunk = data[pos + _REC_HEADER:pos + _REC_HEADER + length]
        pos += _REC_HEADER + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def _put(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    value = json.loads(item.value_json)
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def read_offline_run(path: str | Path) -> OfflineRun:
    """Parse history rows, summary and config from an offline run (see the module docstring)."""
    from wandb.proto import wandb_internal_pb2 as pb

    file = find_run_file(path)
    run = OfflineRun(path=file)
    for blob in _records(file.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(blob)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _put(run.summary, item)
            for item in rec.summary.remove:
                run.summary.pop(item.key, None)
        elif kind == "run":
            for item in rec.run.config.update:
                _put(run.config, item)
        elif kind == "config":
            for item in rec.config.update:
                _put(run.config, item)
    return run
