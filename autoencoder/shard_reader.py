"""Streaming activation shards into training batches: `ShardReader`.

The full-scale run is terabytes, so nothing here holds more than a few blocks in RAM: the reader
memory-maps one shard at a time, copies a block out, and drops the block's pages from its mapping
again so resident memory stays flat however much data streams through. Shards are verified
(sha256, by `autoencoder.shard_check`) before a row of them is used.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoencoder.shard_check import check_shard, read_manifest, verify_once
from tools.core.config import UserError

READER_FORMAT = "monosemantic.shard-reader/1"


class _Stopped(Exception):
    """The prefetch thread was told to stop while waiting for a shard's verification."""


class _MappedShard:
    """One shard memory-mapped read-only; pages are released after each block is copied out."""

    def __init__(self, path: Path, offset: int, rows: int, d_in: int):
        self.fd = os.open(path, os.O_RDONLY)
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        self.offset, self.row_bytes = offset, d_in * 2
        flat = np.frombuffer(self.mm, dtype=np.float16, count=rows * d_in, offset=offset)
        self.rows = flat.reshape(rows, d_in)

    def _advise(self, advice: int | None, start: int, stop: int) -> None:
        if advice is None:
            return
        lo = self.offset + start * self.row_bytes
        hi = self.offset + stop * self.row_bytes
        lo -= lo % mmap.PAGESIZE
        try:
            self.mm.madvise(advice, lo, hi - lo)
        except (OSError, ValueError):
            pass

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of rows [start, stop) from this mapping (they stay in the page cache)."""
        self._advise(getattr(mmap, "MADV_DONTNEED", None), start, stop)

    def prefetch(self, start: int, stop: int) -> None:
        self._advise(getattr(mmap, "MADV_WILLNEED", None), start, stop)

    def close(self) -> None:
        del self.rows
        self.mm.close()
        os.close(self.fd)


class ShardReader:
    """Endless stream of `[batch_size, d_in]` training batches from a shard directory.

    Each epoch visits the shards in a seeded random order and each shard's blocks (`block_rows`
    contiguous rows) in a seeded random order, permuting the rows inside a block, so batches
    differ from epoch to epoch while reads stay sequential-ish. Under DDP the epoch's block
    sequence is dealt round-robin, so ranks see disjoint rows that together cover the epoch. A
    batch may span block and epoch boundaries. `state_dict()` is the position after the last
    batch handed out (not what the prefetch thread has read ahead), so a restored reader yields
    exactly the batches that would have come next.

    With `verify` (the default) each shard's sha256 is checked against the manifest before any of
    its rows are used, once per process: a verifier thread hashes the shards in the order the
    prefetch thread will need them, at most `verify_ahead` shards ahead, so steps do not wait on it.
    A mismatch is a UserError naming the shard, raised from the iterator.
    """

    def __init__(self, directory: str | os.PathLike, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 prefetch: int = 2, block_rows: int = 8192, verify: bool = True, verify_ahead: int = 2):
        if batch_size < 1:
            raise UserError(f"reader batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"reader rank {rank} outside world_size {world_size}")
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.d_in = int(self.manifest["d_in"])
        self.total_rows = int(self.manifest["total_rows"])
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), rank, world_size
        self.dtype, self.device, self.prefetch = dtype, torch.device(device), max(1, int(prefetch))
        self.entries = self.manifest["shards"]
        self.offsets = [check_shard(self.directory, e, self.d_in) for e in self.entries]
        # enough blocks that every rank gets rows each epoch, even for a tiny directory
        self.block_rows = max(1, min(int(block_rows), math.ceil(self.total_rows / (4 * world_size))))
        self._blocks = [math.ceil(int(e["rows"]) / self.block_rows) for e in self.entries]
        if sum(self._blocks) < world_size:
            raise UserError(f"{self.directory}: {self.total_rows} rows cannot be split over "
                            f"{world_size} ranks")
        self._pin = self.device.type == "cuda"
        self._state = {"epoch": 0, "block": 0, "offset": 0}
        self._epoch_cache: tuple[int, list[tuple[int, int]]] | None = None
        # (prefetch thread, stop event, batch queue, verifier thread or None)
        self._worker: tuple[threading.Thread, threading.Event, queue.Queue, threading.Thread | None] | None \
            = None
        self._mapped: tuple[int, _MappedShard] | None = None
        self._lock = threading.RLock()
        self.verify, self.verify_ahead = bool(verify), max(1, int(verify_ahead))
        self._checked: dict[int, UserError | None] = {}  # shard -> None (ok) or the refusal
        self._cond = threading.Condition()
        self._order: list[int] = []  # the verifier's shard order for the current iteration
        self._pos = 0  # index in _order of the shard the prefetch thread reads

    # -- the deterministic order
    def _epoch_blocks(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, block) pairs this rank reads in `epoch`."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order: list[tuple[int, int]] = []
            for s in rng.permutation(len(self.entries)):
                order.extend((int(s), int(b)) for b in rng.permutation(self._blocks[s]))
            self._epoch_cache = (epoch, order[self.rank::self.world_size])
        return self._epoch_cache[1]

    def rows_per_epoch(self) -> int:
        """Rows this rank sees per epoch (the same every epoch)."""
        rng = np.random.default_rng([self.seed, 0])
        order = [(int(s), int(b)) for s in rng.permutation(len(self.entries))
                 for b in rng.permutation(self._blocks[s])]
        return sum(self._block_len(s, b) for s, b in order[self.rank::self.world_size])

    def _block_len(self, shard: int, block: int) -> int:
        return min(self.block_rows, int(self.entries[shard]["rows"]) - block * self.block_rows)

    def _verify_order(self) -> list[int]:
        """Shards in the order the prefetch thread will first need them from the current position."""
        seen: dict[int, None] = {}
        blocks = self._epoch_blocks(self._state["epoch"])[self._state["block"]:]
        for s, _ in blocks + self._epoch_blocks(self._state["epoch"] + 1):
            seen.setdefault(s, None)
        for s in range(len(self.entries)):
            seen.setdefault(s, None)
        return list(seen)

    def _verifier(self, order: list[int], stop: threading.Event) -> None:
        for i, s in enumerate(order):
            with self._cond:
                while i > self._pos + self.verify_ahead and not stop.is_set():
                    self._cond.wait(0.1)
            if stop.is_set():
                return
            if s in self._checked:
                continue
            e = self.entries[s]
            try:
                ok, err = verify_once(self.directory / e["file"], str(e["sha256"]), stop=stop), None
            except UserError as ex:
                ok, err = True, ex
            except OSError as ex:
                ok, err = True, UserError(f"shard {self.directory / e['file']}: cannot read it ({ex})")
            if not ok:
                return
            with self._cond:
                self._checked[s] = err
                self._cond.notify_all()

    def _wait_verified(self, shard: int, stop: threading.Event | None) -> None:
        if not self.verify:
            return
        with self._cond:
            if shard in self._order:
                self._pos = max(self._pos, self._order.index(shard))
                self._cond.notify_all()
            while shard not in self._checked and (stop is None or not stop.is_set()):
                if shard not in self._order:
                    break
                self._cond.wait(0.1)
        if shard not in self._checked and (stop is None or not stop.is_set()):
            e = self.entries[shard]  # not in the verifier's order: check here
            verify_once(self.directory / e["file"], str(e["sha256"]))
            self._checked[shard] = None
        err = self._checked.get(shard)
        if err is not None:
            raise err

    def _shard(self, shard: int, stop: threading.Event | None = None) -> _MappedShard:
        if self._mapped is None or self._mapped[0] != shard:
            self._wait_verified(shard, stop)
            if stop is not None and stop.is_set():
                raise _Stopped
            if self._mapped is not None:
                self._mapped[1].close()
            e = self.entries[shard]
            self._mapped = (shard, _MappedShard(self.directory / e["file"], self.offsets[shard],
                                                int(e["rows"]), self.d_in))
        return self._mapped[1]

    def _alloc(self) -> tuple[np.ndarray, torch.Tensor | None]:
        """An fp16 batch buffer; on CUDA a pinned tensor's memory, so the copy to it is the only one."""
        if self._pin:
            t = torch.empty((self.batch_size, self.d_in), dtype=torch.float16, pin_memory=True)
            return t.numpy(), t
        return np.empty((self.batch_size, self.d_in), dtype=np.float16), None

    def _finish(self, out: np.ndarray, t: torch.Tensor | None) -> torch.Tensor:
        if t is not None:
            return t  # fp16 over the bus, converted on the device
        if self.dtype == torch.float32:
            return torch.from_numpy(out.astype(np.float32))  # numpy's F16C path beats torch's on CPU
        return torch.from_numpy(out).to(self.dtype)

    def _batches(self, state: dict[str, int], stop: threading.Event) -> Iterator[tuple[torch.Tensor, dict]]:
        """Gather rows straight from the mapped shard into the batch buffer, block by block."""
        epoch, blk, off = state["epoch"], state["block"], state["offset"]
        out, t, filled = None, None, 0
        while not stop.is_set():
            blocks = self._epoch_blocks(epoch)
            while blk < len(blocks):
                shard, b = blocks[blk]
                n, start = self._block_len(shard, b), b * self.block_rows
                perm = np.random.default_rng([self.seed, epoch, shard, b, 1]).permutation(n)
                try:
                    m = self._shard(shard, stop)
                except _Stopped:
                    return
                if blk + 1 < len(blocks) and blocks[blk + 1][0] == shard:
                    nxt = blocks[blk + 1][1]
                    m.prefetch(nxt * self.block_rows, nxt * self.block_rows + self._block_len(shard, nxt))
                view = m.rows[start:start + n]
                while off < n:
                    if out is None:
                        (out, t), filled = self._alloc(), 0
                    take = min(self.batch_size - filled, n - off)
                    np.take(view, perm[off:off + take], axis=0, out=out[filled:filled + take], mode="clip")
                    off, filled = off + take, filled + take
                    if filled == self.batch_size:
                        yield self._finish(out, t), {"epoch": epoch, "block": blk, "offset": off}
                        out = None
                        if stop.is_set():
                            return
                del view  # no view may outlive the mapping
                m.release(start, start + n)
                blk, off = blk + 1, 0
            epoch, blk = epoch + 1, 0

    def _producer(self, state: dict, stop: threading.Event, q: queue.Queue) -> None:
        try:
            for item in self._batches(state, stop):
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            while not stop.is_set():
                try:
                    q.put(("error", e), timeout=0.1)
                    return
                except queue.Full:
                    continue

    def _stop_worker(self) -> None:
        if self._worker is None:
            return
        thread, stop, q, checker = self._worker
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
        if checker is not None:
            checker.join()
        self._worker = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        with self._lock:
            self._stop_worker()  # a new iteration continues from the last batch handed out
            stop, q = threading.Event(), queue.Queue(maxsize=self.prefetch)
            thread = threading.Thread(target=self._producer, args=(dict(self._state), stop, q),
                                      name="shard-prefetch", daemon=True)
            checker = None
            if self.verify:
                self._order, self._pos = self._verify_order(), 0
                checker = threading.Thread(target=self._verifier, args=(self._order, stop),
                                           name="shard-verify", daemon=True)
            self._worker = (thread, stop, q, checker)
            if checker is not None:
                checker.start()
            thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item[0], str):
                    raise item[1]
                t, after = item
                if self._pin:
                    t = t.to(self.device, non_blocking=True).to(self.dtype)
                self._state = after
                yield t
        finally:
            if self._worker is not None and self._worker[1] is stop:
                with self._lock:
                    self._stop_worker()

    def state_dict(self) -> dict[str, Any]:
        return {"format": READER_FORMAT, **self._state, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "block_rows": self.block_rows,
                "total_rows": self.total_rows, "shards": len(self.entries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "world_size", "block_rows", "total_rows", "shards"):
            have = getattr(self, key) if key != "shards" else len(self.entries)
            if key in state and int(state[key]) != int(have):
                raise UserError(f"reader state from a different setup: {key}={state[key]}, now {have} "
                                f"({self.directory}); exact resume needs the same shards, seed and "
                                "world size")
        with self._lock:
            self._stop_worker()
            self._state = {k: int(state[k]) for k in ("epoch", "block", "offset")}

    def close(self) -> None:
        with self._lock:
            self._stop_worker()
            if self._mapped is not None:
                self._mapped[1].close()
                self._mapped = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
