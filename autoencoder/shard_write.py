"""Writing activation shards: one `float16 [rows, d_in]` `.npy` shard at a time, atomically.

A shard's sha256 is computed while it is written (no second read); `write_shards` writes a whole
directory (shards, `resample.npy`, `manifest.json`) from rows in memory, for tests and small tools.
The directory layout and manifest are in docs/formats.md.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from autoencoder.shard_check import DTYPE, FORMAT, MANIFEST, RESAMPLE
from tools.core.files import atomic_path, read_json, write_json

DEFAULT_HOOK = "blocks.0.mlp.hook_post"


def shard_name(index: int) -> str:
    """`shard_00042.npy`."""
    return f"shard_{index:05d}.npy"


class _HashingFile:
    """File wrapper that hashes what is written, so a shard's sha256 costs no second read. Chunks of
    a MiB and more are hashed on a helper thread (hashlib releases the GIL) while the next is written
    and gathered; `digest()` waits for the last."""

    PARALLEL_BYTES = 1 << 20

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()
        self.pool: ThreadPoolExecutor | None = None
        self.pending: list[Future] = []

    def write(self, data) -> int:
        if len(data) < self.PARALLEL_BYTES:
            self._wait()
            self.h.update(data)
        else:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-hash")
            self._wait(keep=1)  # at most two chunks held: the one hashing and this one
            self.pending.append(self.pool.submit(self.h.update, data))  # one worker: in order
        return self.f.write(data)

    def _wait(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            self.pending.pop(0).result()

    def hexdigest(self) -> str:
        self.close()
        return self.h.hexdigest()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None


def npy_header(shape: tuple[int, ...], dtype: str = DTYPE) -> bytes:
    """The `.npy` header numpy writes for a C-ordered array of this shape and dtype."""
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def write_shard(path: str | os.PathLike, rows: np.ndarray | Iterator[np.ndarray], n_rows: int | None = None,
                d_in: int | None = None) -> dict[str, Any]:
    """Write one `float16 [rows, d_in]` `.npy` shard atomically; returns its manifest entry.

    `rows` is an array, or an iterator of row chunks (then `n_rows` and `d_in` are required) so a
    shard can be written in pieces, e.g. gathered through a permutation, without a second copy.
    A chunk is hashed while later ones are written: it must not change once handed over.
    """
    path = Path(path)
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2:
            raise ValueError(f"shard rows must be 2-D [rows, d_in], got shape {rows.shape}")
        n_rows, d_in, chunks = rows.shape[0], rows.shape[1], iter([rows])
    else:
        if n_rows is None or d_in is None:
            raise ValueError("write_shard from chunks needs n_rows and d_in")
        chunks = rows
    written = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw:
            f = _HashingFile(raw)
            try:
                f.write(npy_header((n_rows, d_in)))
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=np.float16)
                    if chunk.ndim != 2 or chunk.shape[1] != d_in:
                        raise ValueError(f"{path}: chunk of shape {chunk.shape}, expected [*, {d_in}]")
                    f.write(memoryview(chunk).cast("B"))
                    written += chunk.shape[0]
                if written != n_rows:
                    raise ValueError(f"{path}: {written} rows written, {n_rows} announced")
                raw.flush()
                os.fsync(raw.fileno())
                sha = f.hexdigest()
            finally:
                f.close()
    return {"file": path.name, "rows": int(n_rows), "sha256": sha}


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """`manifest.json` (atomically), with the format tag first."""
    write_json(Path(directory) / MANIFEST, {"format": FORMAT, **manifest})


def write_shards(directory: str | os.PathLike, rows: np.ndarray, rows_per_shard: int, *,
                 split: str = "train", seed: int = 0, hook_name: str = DEFAULT_HOOK,
                 model: dict[str, Any] | None = None, tokens_per_context: int | None = None,
                 block_size: int | None = None, contexts: int | None = None,
                 resample_rows: int | None = None, **extra: Any) -> dict[str, Any]:
    """Write a complete shard directory from rows already in memory (tests, small tools).

    Rows are written in the order given (shuffle them first if that matters). `resample_rows`:
    rows of `resample.npy`, a uniform sample without replacement (None: min(rows, 8192); 0: none).
    Returns the manifest.
    """
    directory = Path(directory)
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty [rows, d_in] array, got shape {rows.shape}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    n, d_in = rows.shape
    entries = [write_shard(directory / shard_name(i), rows[start:start + rows_per_shard])
               for i, start in enumerate(range(0, n, rows_per_shard))]
    n_res = min(n, 8192) if resample_rows is None else min(int(resample_rows), n)
    res_sha = None
    if n_res > 0:
        pick = np.random.default_rng([seed, 7]).choice(n, size=n_res, replace=False)
        res_sha = write_shard(directory / RESAMPLE, rows[pick])["sha256"]
    manifest = {
        "d_in": int(d_in), "dtype": DTYPE, "hook_name": hook_name,
        "model": model or {"path": None, "config_hash": None}, "split": split,
        "contexts": contexts, "tokens_per_context": tokens_per_context, "block_size": block_size,
        "rows_per_shard": int(rows_per_shard), "total_rows": int(n), "shards": entries,
        "resample_rows": int(n_res), "resample_sha256": res_sha, "seed": seed, **extra, "complete": True,
    }
    write_manifest(directory, manifest)
    return read_json(directory / MANIFEST)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` to a temporary name, renamed when complete."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
