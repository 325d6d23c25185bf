"""Row-paired shard folders: a transcoder reads one hook point (the MLP's input) and reconstructs
another (its output), so row i of both folders must be the same token of the same forward.

`autoencoder.generate` with several hook points (`activations.hook=[mlp_in, mlp_out]`) writes such
folders; their manifests share `rows_key` (the output hash without the hook point, with the world
size). `check_paired` refuses two folders that do not share their rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
    why = unpaired(ma, mb)
    if why:
        raise UserError(f"activation folders {a} and {b} do not hold the same rows ({why}); a transcoder "
                        "needs both hook points from one autoencoder.generate run, e.g. "
                        "activations.hook=[mlp_in,mlp_out]")
    return int(ma["total_rows"])
