"""Paired rows for transcoders: two shard folders whose row i is the same token, read in step.

`autoencoder.generate` writes every hook point of one run from the same forward passes, so the
folders of `sae.hook_in` and `sae.hook_out` hold the same tokens in the same order, shard for
shard. Two `ShardReader`s with the same seed, batch size and ranks then visit the same rows: the
visiting order depends only on the seed and the shards' row counts (`ShardReader._epoch_blocks`
and its per-block permutations). `check_paired` refuses folders that do not share rows (different
tokens, counts or shard layout); `PairedReader` yields `(x, y)` batches and resumes both readers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tools.core.config import UserError

# manifest fields that must agree for row i of both folders to be the same token
SAME = ("split", "contexts", "tokens_per_context", "block_size", "seed", "total_rows", "data", "model",
        "world_size")


def check_paired(m_in: dict[str, Any], m_out: dict[str, Any], dir_in: Path, dir_out: Path) -> None:
    """UserError naming the first manifest field on which the two folders' rows differ."""
    for key in SAME:
        if m_in.get(key) != m_out.get(key):
            raise UserError(f"transcoder shards do not share rows: `{key}` is {m_in.get(key)!r} in "
                            f"{dir_in} but {m_out.get(key)!r} in {dir_out} (generate both hook points "
                            "in one autoencoder.generate run)")
    rows_in = [int(e["rows"]) for e in m_in.get("shards", [])]
    rows_out = [int(e["rows"]) for e in m_out.get("shards", [])]
    if rows_in != rows_out:
        raise UserError(f"transcoder shards do not share rows: shard row counts {rows_in[:4]}... in {dir_in} "
                        f"but {rows_out[:4]}... in {dir_out}")


class PairedReader:
    """Two `ShardReader`s over row-aligned folders, yielding `(x, y)`; same interface otherwise."""

    def __init__(self, dir_in: Path, dir_out: Path, batch_size: int, **kw: Any):
        from autoencoder.shard_reader import ShardReader

        self.inp = ShardReader(dir_in, batch_size, **kw)
        self.out = ShardReader(dir_out, batch_size, **kw)
        check_paired(self.inp.manifest, self.out.manifest, Path(dir_in), Path(dir_out))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(iter(self.inp), iter(self.out), strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"in": self.inp.state_dict(), "out": self.out.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inp.load_state_dict(state["in"])
        self.out.load_state_dict(state["out"])

    def close(self) -> None:
        self.inp.close()
        self.out.close()
