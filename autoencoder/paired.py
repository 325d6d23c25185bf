"""Row-paired shard folders: a transcoder reads one hook point (the MLP's input) and reconstructs
another (its output), so row i of both folders must be the same token of the same forward.

`autoencoder.generate` with several hook points (`activations.hook=[mlp_in, mlp_out]`) writes such
folders from the same forward passes; their manifests share `rows_key` (the output hash without the
hook point, with the world size). Two `ShardReader`s with the same seed, batch size and ranks then
visit the same rows: the visiting order depends only on the seed and the shards' row counts.
`check_paired` refuses folders that do not share their rows; `PairedReader` yields `(x, y)`
batches and resumes both readers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from autoencoder.shard_check import read_manifest
from tools.core.config import UserError

# manifest keys that decide which token each row is (besides the hook point)
ROW_KEYS = ("model", "data", "split", "seed", "contexts", "tokens_per_context", "block_size",
            "rows_per_shard", "total_rows", "world_size")


def unpaired(ma: dict[str, Any], mb: dict[str, Any]) -> str | None:
    """Why two complete manifests do not hold the same rows, or None when they do."""
    for key in ROW_KEYS:
        va, vb = ma.get(key), mb.get(key)
        if va != vb:
            if isinstance(va, dict) or isinstance(vb, dict):
                return f"{key} differs"
            return f"{key} {va!r} vs {vb!r}"
    sa = [(s.get("file"), s.get("rows")) for s in ma["shards"]]
    sb = [(s.get("file"), s.get("rows")) for s in mb["shards"]]
    if sa != sb:
        return "their shards differ in names or row counts"
    ka, kb = ma.get("rows_key"), mb.get("rows_key")
    if ka is None or kb is None:
        return "a manifest has no rows_key (written before paired generation; regenerate both together)"
    if ka != kb:
        return "rows_key differs (other activations settings, e.g. batch_contexts, or another generation)"
    return None


def check_paired(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> int:
    """The number of rows two complete shard folders share, row for row; a UserError naming both
    folders when they were not written by one generation (other model, data, seed, contexts,
    settings, world size or token order)."""
    a, b = Path(dir_a), Path(dir_b)
    ma, mb = read_manifest(a), read_manifest(b)
    require_paired(ma, mb, a, b)
    return int(ma["total_rows"])


def require_paired(ma: dict[str, Any], mb: dict[str, Any], a: Path, b: Path) -> None:
    """`check_paired` on manifests already read."""
    why = unpaired(ma, mb)
    if why:
        raise UserError(f"activation folders {a} and {b} do not hold the same rows ({why}); a transcoder "
                        "needs both hook points from one autoencoder.generate run, e.g. "
                        "activations.hook=[mlp_in,mlp_out]")


class PairedReader:
    """Two `ShardReader`s over row-aligned folders, yielding `(x, y)`; same interface otherwise."""

    def __init__(self, dir_in: Path, dir_out: Path, batch_size: int, **kw: Any):
        from autoencoder.shard_reader import ShardReader

        self.inp = ShardReader(dir_in, batch_size, **kw)
        self.out = ShardReader(dir_out, batch_size, **kw)
        require_paired(self.inp.manifest, self.out.manifest, Path(dir_in), Path(dir_out))

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
