"""The first rows of a shard folder, read in the reader's seeded order: held-out rows for the
evaluator, the initialisation sample for the trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from autoencoder.shard_check import read_manifest
from autoencoder.shard_reader import ShardReader


def take_rows(directory: Path, rows: int, *, seed: int, d_in: int | None = None) -> torch.Tensor:
    """Up to `rows` rows (float32, CPU) of `directory`'s shards, in `ShardReader(seed=seed)` order, so
    the same on every rank and every call; `d_in`: checked against the manifest."""
    want = min(rows, int(read_manifest(directory, d_in=d_in)["total_rows"]))
    reader = ShardReader(directory, max(1, min(want, 8192)), seed=seed, device="cpu")
    try:
        parts, got = [], 0
        for batch in reader:
            parts.append(batch[: want - got])
            got += parts[-1].shape[0]
            if got >= want:
                break
    finally:
        reader.close()
    return torch.cat(parts)
