"""Activation shards on disk: writing, checking, and streaming them into training batches.

A shard directory (docs/formats.md) holds `shard_00000.npy`, ... (`float16 [rows, d_in]`, rows
already shuffled across contexts by `autoencoder.generate`), `manifest.json` and `resample.npy`.
The full-scale run is terabytes, so nothing here holds more than a few blocks in RAM: the reader
memory-maps one shard at a time, copies a block out, and drops the block's pages from its mapping
again so resident memory stays flat however much data streams through.

`python -m autoencoder.shards run_dir=... [activations.split=val]` prints a directory's manifest
summary and verifies every shard (sha256, header, size).
"""

from __future__ import annotations

import hashlib
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

from autoencoder.shard_check import (  # noqa: F401 (re-exported: the checking half of this module)
    _VERIFIED,
    DTYPE,
    FORMAT,
    MANIFEST,
    RESAMPLE,
    check_shard,
    read_manifest,
    verify_once,
    verify_resample,
    verify_shards,
)
from tools.core.config import UserError, stage_main
from tools.core.files import atomic_path, read_json, write_json
from tools.core.layout import RunLayout

READER_FORMAT = "monosemantic.shard-reader/1"
DEFAULT_HOOK = "blocks.0.mlp.hook_post"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


# ----------------------------------------------------------------------------------------- writing


class _HashingFile:
    """File wrapper that hashes what is written, so a shard's sha256 costs no second read."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)


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
    return {"file": path.name, "rows": int(n_rows), "sha256": f.h.hexdigest()}


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
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


# ----------------------------------------------------------------------------------------- reading


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


# ----------------------------------------------------------------------------------------- inspect


def summary(m: dict[str, Any]) -> str:
    gb = int(m["total_rows"]) * int(m["d_in"]) * 2 / 1e9
    model = m.get("model") or {}
    return "\n".join([
        f"split {m.get('split')}: {m['total_rows']:,} rows x d_in {m['d_in']} ({m['dtype']}, {gb:.3g} GB) "
        f"in {len(m['shards'])} shards (~{m.get('rows_per_shard')} rows each)",
        f"hook {m.get('hook_name')}; {m.get('contexts')} contexts x {m.get('tokens_per_context')} tokens "
        f"(block_size {m.get('block_size')}); seed {m.get('seed')}",
        f"model {model.get('path')} (config hash {model.get('config_hash')}); "
        f"resample.npy {m.get('resample_rows')} rows; complete {m.get('complete')}",
    ])


def run(cfg) -> dict[str, Any]:
    """Inspect `run_dir/activations/<split>/`: manifest summary, then every shard verified."""
    directory = RunLayout.of(cfg).activations_split(str(cfg.activations.split))
    m = read_manifest(directory)
    print(summary(m), flush=True)
    result = verify_shards(directory, progress=True)
    print(f"verified {result['shards']} shards ({result['bytes'] / 1e6:.1f} MB) in {directory}: "
          "sha256, header and size all match the manifest", flush=True)
    return result


def done(cfg) -> bool:
    """Inspection writes nothing, so it is never 'done' for the pipeline."""
    return False


main = stage_main(run)

if __name__ == "__main__":
    main()
