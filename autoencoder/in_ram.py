"""The in-RAM shuffle: pass 1 puts each row straight into its final place in memory-mapped shard
files, and pass 2 only hashes them and moves them into the output folder.

autoencoder.generate takes this path when a rank's shards fit in RAM (`activations.in_ram_gb`), and
the two-pass shuffle of autoencoder.scatter otherwise. The shards are the same bytes either way:
a row's shard is the same `scatter_dest` draw, and its place in the shard is the inverse of the
same `shard_perm`, which is known before the first forward because every batch's draws are. A
checkpoint writes the mapped pages back (fsync) before it records the batch, so a killed run resumes
from it like the two-pass one; rows of later batches are simply placed again.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from autoencoder import shard_check, shard_write
from autoencoder.scatter import SPLITS, Rows, Scatter, scatter_dest, shard_perm
from tools.core import preempt
from tools.core.config import UserError
from tools.core.files import sha256_file, write_json

CHECKPOINT_S = 120.0  # seconds of pass 1 between checkpoints (a SIGTERM checkpoints at once)
# Linux 5.14 (Python names it from 3.12): fault every page of a mapping in at once
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)


class _Part:
    """One shard being filled: its `.npy` file in the work folder, mapped, and its rows as an array."""

    def __init__(self, path: Path, rows: int, d_in: int, *, resumed: bool, writing: bool = True):
        header = shard_write.npy_header((rows, d_in))
        size = len(header) + rows * d_in * 2
        if not path.is_file() or path.stat().st_size != size:
            if resumed:
                raise UserError(f"{path}: missing or not {size} bytes, yet the checkpoint counts rows in it; "
                                f"delete {path.parent} to restart")
            with open(path, "wb") as f:
                f.write(header)
                f.truncate(size)
        self.path, self.fd = path, os.open(path, os.O_RDWR)
        try:  # the disk blocks now: a full disk is an error here, not a SIGBUS while placing rows
            if writing and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            os.close(self.fd)
            raise UserError(f"no room for {path} ({size:,} bytes: {e}); free space and rerun") from e
        self.map = mmap.mmap(self.fd, size)
        if writing and _POPULATE_WRITE is not None:
            try:  # several times cheaper than a fault per page while placing rows
                self.map.madvise(_POPULATE_WRITE)
            except (OSError, ValueError):
                pass
        self.rows = np.frombuffer(self.map, np.float16, rows * d_in, len(header)).reshape(rows, d_in)

    def sync(self) -> None:
        os.fsync(self.fd)  # also writes back the pages changed through the mapping

    def sha256(self) -> str:
        return hashlib.sha256(self.map).hexdigest()  # hashlib releases the GIL for a buffer this large

    def close(self) -> None:
        del self.rows
        self.map.close()
        os.close(self.fd)


class InRamScatter(Scatter):
    """Pass 1 on one rank with every row placed in its shard at once; the same interface as Scatter.
    `batch_rows`: the rows of each of this rank's batches, in order."""

    def __init__(self, work: Path, key: str, n_shards: int, d_in: int, budget_bytes: int,
                 res_ids: np.ndarray, seed: int, split: str, rank: int, *, batch_rows: list[int]):
        self.batch_rows = batch_rows
        self.parts: dict[int, _Part] = {}
        super().__init__(work, key, n_shards, d_in, budget_bytes, res_ids, seed, split, rank)
        counts = self.counts = np.zeros(n_shards, np.int64)
        fill = self.fill = np.zeros(n_shards, np.int64)
        for i in range(len(batch_rows)):
            c = np.bincount(self._dest(i), minlength=n_shards)
            counts += c
            if i < self.state["batches"]:
                fill += c
        self.inv: dict[int, np.ndarray] = {}
        self.synced = time.monotonic()

    def resume(self) -> None:
        """Nothing to drop: rows of batches after the checkpoint are placed again, in the same places."""

    def _open(self) -> None:
        """Map every shard of this rank and learn where its rows go (on the writer thread, beside the
        first forward)."""
        resumed = self.state["batches"] > 0
        for k in map(int, np.flatnonzero(self.counts)):
            perm = shard_perm(self.seed, self.split_id, self.rank, k, int(self.counts[k]))
            inv = self.inv[k] = np.empty_like(perm)
            inv[perm] = np.arange(len(perm))  # where each row of the shard, in global order, goes
            self.parts[k] = _Part(self.part(k), int(self.counts[k]), self.d, resumed=resumed)

    def due(self) -> bool:
        """Time for a checkpoint: every CHECKPOINT_S seconds. Writing mapped pages back while the forward
        runs costs it (each page is write-protected again), so not after every shard's worth of rows."""
        return time.monotonic() - self.synced >= CHECKPOINT_S

    def part(self, k: int) -> Path:
        return self.work / f"part_{k:05d}.npy"

    def _dest(self, i: int) -> np.ndarray:
        return scatter_dest(self.seed, self.split_id, self.rank, i, self.batch_rows[i], self.S)

    def add(self, batch_index: int, first_row: int, rows: Rows) -> None:
        """Place one batch's rows (rows `first_row ...` in global order) and keep its resample rows."""
        if len(rows) != self.batch_rows[batch_index]:
            raise ValueError(f"batch {batch_index}: {len(rows)} rows, planned {self.batch_rows[batch_index]}")
        if not self.parts:
            self._open()
        self.keep_resample(first_row, rows)
        dest = self._dest(batch_index)
        order = np.argsort(dest, kind="stable")
        counts = np.bincount(dest, minlength=self.S)
        ends = np.cumsum(counts)
        for k in np.flatnonzero(counts):
            c, f = counts[k], self.fill[k]
            self.parts[k].rows[self.inv[k][f:f + c]] = rows.at(order[ends[k] - c:ends[k]])
            self.fill[k] += c
        self.buffered += len(rows) * self.d * 2

    def flush(self, batches_done: int) -> None:
        """Write the placed rows back to disk, then checkpoint."""
        try:
            for p in self.parts.values():
                p.sync()
            if self.res is not None:
                self.res.flush()
        except OSError as e:
            raise UserError(f"writing activation shards in {self.work} failed ({e}); nothing complete "
                            "was lost: free space and rerun to resume from the last checkpoint") from e
        self.buffered, self.synced = 0, time.monotonic()
        self.state.update(batches=batches_done)
        write_json(self.progress_path, self.state)

    def pass2(self, first_shard: int, directory: Path, tqdm: Any) -> list[dict[str, Any]]:
        """Each shard made durable and hashed (on as many threads as cores), then moved into place."""
        todo, entries = [], {}
        for k in map(int, np.flatnonzero(self.counts)):
            entry = self.state["shards"].get(str(k))
            if entry is not None and (directory / entry["file"]).is_file():
                try:
                    shard_check.check_shard(directory, entry, self.d)
                    entries[k] = entry
                    continue
                except UserError:
                    pass
            if k not in self.parts:  # resumed in pass 2
                final = directory / shard_write.shard_name(first_shard + k)
                if not self.part(k).is_file() and final.is_file():  # moved, then killed before the checkpoint
                    entries[k] = {"file": final.name, "rows": int(self.counts[k]),
                                  "sha256": sha256_file(final)}
                    shard_check.check_shard(directory, entries[k], self.d)
                    continue
                if not self.part(k).is_file():
                    raise UserError(f"{self.part(k)}: missing, and shard {first_shard + k} is not complete; "
                                    f"delete {self.work} and rerun to regenerate")
                self.parts[k] = _Part(self.part(k), int(self.counts[k]), self.d, resumed=True, writing=False)
            todo.append(k)

        def seal(k: int) -> str:
            """Durable, hashed, unmapped."""
            part = self.parts.pop(k)
            try:
                part.sync()
                return part.sha256()
            finally:
                part.close()

        with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            shas = pool.map(seal, todo)
            for k, sha in tqdm(zip(todo, shas, strict=True), total=len(todo), desc="seal shards",
                               unit="shard", disable=self.rank != 0):
                if preempt.requested():  # every shard before k is in place and checkpointed
                    raise preempt.Preempted(f"activations {SPLITS[self.split_id]}",
                                            f"shard {k} of {self.S} (pass 2)", preempt.saved_hint(self.work))
                name = shard_write.shard_name(first_shard + k)
                try:
                    os.replace(self.part(k), directory / name)
                except OSError as e:
                    raise UserError(f"moving {self.part(k)} to {directory / name} failed ({e}); "
                                    "completed shards are kept: rerun to resume") from e
                entries[k] = {"file": name, "rows": int(self.counts[k]), "sha256": sha}
                self.state["shards"][str(k)] = entries[k]
                write_json(self.progress_path, self.state)
        return [entries[k] for k in sorted(entries)]
