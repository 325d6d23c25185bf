"""The two passes of activation generation (autoencoder.generate drives them): the context plan;
pass 1, the forward passes and the scatter of rows into bucket files with checkpoints; pass 2, the
per-bucket shuffle into shards.

Everything is a function of the seed (contexts, positions, scatter, permutations), so a killed run
resumes to the same bytes, and the shards of several hook points generated together hold their rows
in the same order (row i of every hook's shards is the same token).
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoencoder import shard_check, shard_write
from tools.core import preempt
from tools.core.config import UserError
from tools.core.files import read_json, write_json
from transformer.data import open_tokens
from transformer.subject import Subject

SPLITS = ("train", "val")
CHUNK = 1024  # contexts drawn per RNG stream, so the sample does not depend on batch size or ranks
WORK_FORMAT = "monosemantic.activations-work/1"


class ContextPlan:
    """Start offsets and kept positions of every context, from per-chunk RNG streams."""

    def __init__(self, seed: int, split: str, n_tokens: int, context_len: int, per_context: int):
        self.seed, self.split_id = seed, SPLITS.index(split)
        self.n_tokens, self.L, self.T = n_tokens, context_len, per_context
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _chunk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._cache:
            rng = np.random.default_rng([self.seed, self.split_id, 1, k])
            starts = rng.integers(0, self.n_tokens - self.L + 1, size=CHUNK, dtype=np.int64)
            keys = rng.random((CHUNK, self.L), dtype=np.float32)
            # T distinct positions per context, uniformly: the T smallest of L random keys
            pos = keys.argsort(axis=1) if self.T == self.L else np.argpartition(keys, self.T - 1, axis=1)
            self._cache = {k: (starts, pos[:, : self.T].astype(np.int64))}
        return self._cache[k]

    def get(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        starts, pos = [], []
        c = lo
        while c < hi:
            k, i = divmod(c, CHUNK)
            n = min(hi - c, CHUNK - i)
            s, p = self._chunk(k)
            starts.append(s[i:i + n])
            pos.append(p[i:i + n])
            c += n
        return np.concatenate(starts), np.concatenate(pos)


def resample_indices(seed: int, split: str, total_rows: int, n: int) -> np.ndarray:
    """Sorted global row ids of the resampling subset: uniform, without replacement."""
    if n <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, SPLITS.index(split), 2])
    return np.sort(rng.choice(total_rows, size=min(n, total_rows), replace=False)).astype(np.int64)


def batch_bounds(c_lo: int, c_hi: int, batch_contexts: int) -> list[tuple[int, int]]:
    """The context ranges of a rank's forward batches, in order (pass 1 runs them; the in-RAM shuffle
    plans each one's rows before the first)."""
    return [(lo, min(lo + batch_contexts, c_hi)) for lo in range(c_lo, c_hi, batch_contexts)]


def scatter_dest(seed: int, split_id: int, rank: int, batch_index: int, n_rows: int,
                 n_shards: int) -> np.ndarray:
    """The shard of each row of one batch: uniform, from the batch's own RNG stream."""
    return np.random.default_rng([seed, split_id, 3, rank, batch_index]).integers(0, n_shards, size=n_rows)


def shard_perm(seed: int, split_id: int, rank: int, shard: int, n_rows: int) -> np.ndarray:
    """A shard's order: its row j is row `perm[j]` of its rows taken in global order."""
    return np.random.default_rng([seed, split_id, 5, rank, shard]).permutation(n_rows)


# ------------------------------------------------------------------------------------ pass 1


class NonFinite(ValueError):
    """A row holds an inf or a NaN (fp16 overflow); pass 1 names the hook point and contexts."""


@dataclass
class Rows:
    """One batch's rows of one hook point, fp16: `data[take]` in order, or `data` when take is None."""

    data: np.ndarray
    take: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.data if self.take is None else self.take)

    def at(self, idx: np.ndarray) -> np.ndarray:
        """The batch's rows `idx`, copied; NonFinite if one holds an inf or a NaN."""
        x = self.data[idx if self.take is None else self.take[idx]]
        if ((x.view(np.uint16) & 0x7C00) == 0x7C00).any():  # inf/nan: 8x faster than isfinite
            raise NonFinite
        return x


class Scatter:
    """Pass 1 on one rank: rows -> random bucket files, plus this rank's part of the resample set."""

    def __init__(self, work: Path, key: str, n_shards: int, d_in: int, budget_bytes: int,
                 res_ids: np.ndarray, seed: int, split: str, rank: int):
        self.work, self.key, self.S, self.d = work, key, n_shards, d_in
        self.budget, self.res_ids = budget_bytes, res_ids
        self.seed, self.split_id, self.rank = seed, SPLITS.index(split), rank
        self.buffers: list[list[np.ndarray]] = [[] for _ in range(n_shards)]
        self.buffered = 0
        self.progress_path = work / "progress.json"
        state = read_json(self.progress_path) if self.progress_path.is_file() else None
        if state is None or state.get("key") != key:
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            state = {"format": WORK_FORMAT, "key": key, "pass": 1, "batches": 0,
                     "bucket_rows": [0] * n_shards, "shards": {}}
        self.state = state
        self.bucket_rows = list(state["bucket_rows"])
        if state["pass"] == 1:
            self.resume()
        res_path = work / "resample.npy"
        if len(res_ids) and not res_path.is_file():
            shape = (len(res_ids), d_in)
            np.lib.format.open_memmap(res_path, mode="w+", dtype=np.float16, shape=shape).flush()
        self.res = np.load(res_path, mmap_mode="r+") if len(res_ids) else None

    def resume(self) -> None:
        """Pass 1 goes on from the checkpoint: anything written after it is dropped from the buckets."""
        for k, rows in enumerate(self.bucket_rows):
            p = self.bucket(k)
            want = rows * self.d * 2
            if want == 0:
                p.unlink(missing_ok=True)
                continue
            if not p.is_file() or p.stat().st_size < want:
                raise UserError(f"{p}: shorter than its checkpoint ({want} bytes); "
                                f"delete {self.work} to restart")
            os.truncate(p, want)

    def due(self) -> bool:
        """Time for a checkpoint: a bucket budget's worth of rows is buffered."""
        return self.buffered >= self.budget

    def bucket(self, k: int) -> Path:
        return self.work / f"bucket_{k:05d}.f16"

    def keep_resample(self, first_row: int, rows: Rows) -> None:
        """Copy the rows of this batch (rows `first_row ...` in global order) that resample.npy holds."""
        if self.res is not None:
            lo, hi = np.searchsorted(self.res_ids, [first_row, first_row + len(rows)])
            if hi > lo:
                self.res[lo:hi] = rows.at(self.res_ids[lo:hi] - first_row)

    def add(self, batch_index: int, first_row: int, rows: Rows) -> None:
        """Scatter one batch (rows `first_row ...` in global order) and keep its resample rows."""
        self.keep_resample(first_row, rows)
        dest = scatter_dest(self.seed, self.split_id, self.rank, batch_index, len(rows), self.S)
        order = np.argsort(dest, kind="stable")
        counts = np.bincount(dest, minlength=self.S)
        xs = rows.at(order)
        ends = np.cumsum(counts)
        for k in np.flatnonzero(counts):
            self.buffers[k].append(xs[ends[k] - counts[k]:ends[k]])
        self.buffered += xs.nbytes

    def flush(self, batches_done: int) -> None:
        """Append every buffer to its bucket, make it durable, then checkpoint."""
        try:
            for k, parts in enumerate(self.buffers):
                if not parts:
                    continue
                with open(self.bucket(k), "ab") as f:  # the parts in turn: no copy into one block
                    for part in parts:
                        f.write(memoryview(np.ascontiguousarray(part)).cast("B"))
                    f.flush()
                    os.fsync(f.fileno())
                self.bucket_rows[k] += sum(len(part) for part in parts)
                self.buffers[k] = []
            if self.res is not None:
                self.res.flush()
        except OSError as e:
            raise UserError(f"writing activation buckets in {self.work} failed ({e}); nothing complete "
                            "was lost: free space and rerun to resume from the last checkpoint") from e
        self.buffered = 0
        self.state.update(batches=batches_done, bucket_rows=self.bucket_rows)
        write_json(self.progress_path, self.state)

    def pass2(self, first_shard: int, directory: Path, tqdm: Any) -> list[dict[str, Any]]:
        """Each bucket alone in RAM: permuted, written as `shard_<first_shard + k>.npy` in `directory`
        (atomically), checkpointed, dropped; returns the shards' manifest entries."""
        entries = []
        for k in tqdm(range(self.S), desc="shuffle shards", unit="shard", disable=self.rank != 0):
            if k and preempt.requested():  # every shard before k is written and checkpointed
                raise preempt.Preempted(f"activations {SPLITS[self.split_id]}",
                                        f"shard {k} of {self.S} (pass 2)", preempt.saved_hint(self.work))
            name = shard_write.shard_name(first_shard + k)
            entry = self.state["shards"].get(str(k))
            path = directory / name
            if entry is not None and path.is_file():
                try:
                    shard_check.check_shard(directory, entry, self.d)
                    entries.append(entry)
                    continue
                except UserError:
                    pass  # rewritten below if its bucket is still there
            rows = self.bucket_rows[k]
            if rows == 0:
                continue
            bucket = self.bucket(k)
            if not bucket.is_file() or bucket.stat().st_size != rows * self.d * 2:
                raise UserError(f"{bucket}: missing or not {rows} rows, and {path} is not complete; "
                                f"delete {self.work} and rerun to regenerate")
            x = np.fromfile(bucket, dtype=np.float16).reshape(rows, self.d)
            perm = shard_perm(self.seed, self.split_id, self.rank, k, rows)
            step = max(1, (1 << 24) // (self.d * 2))
            try:
                chunks = (x[perm[i:i + step]] for i in range(0, rows, step))
                entry = shard_write.write_shard(path, chunks, rows, self.d)
            except OSError as e:
                raise UserError(f"writing {path} failed ({e}); completed shards are kept: free space and "
                                "rerun to resume at this shard") from e
            del x
            self.state["shards"][str(k)] = entry
            write_json(self.progress_path, self.state)
            bucket.unlink()
            entries.append(entry)
        return entries


# ------------------------------------------------------------------------ pass 1: the forward passes


def pass1(subject: Subject, scs: dict[str, Scatter], plan: ContextPlan, tokens_path: Path, *, c_lo: int,
          c_hi: int, batch_contexts: int, rank: int, tqdm: Any) -> None:
    """Contexts c_lo .. c_hi - 1 through the subject, `batch_contexts` at a time: forward passes on
    the main thread (one per batch for every hook), scattering and disk writes on a writer thread.

    SIGTERM/SIGINT stop it at the next batch: the buffers are flushed (a checkpoint pass 1 resumes
    from) and `Preempted` is raised."""
    T, B, split = plan.T, batch_contexts, SPLITS[plan.split_id]
    tokens = open_tokens(tokens_path.parent, tokens_path.stem)
    vocab = subject.spec.vocab_size
    bounds = batch_bounds(c_lo, c_hi, B)
    n_batches = len(bounds)
    done_batches = {h: int(sc.state["batches"]) for h, sc in scs.items()}
    start = min(done_batches.values())
    arange = np.arange(plan.L, dtype=np.int64)
    q: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []
    hooks = list(scs)

    def writer() -> None:
        try:
            while (item := q.get()) is not None:
                i, first_row, batch = item
                for h, rows in batch.items():
                    if i < done_batches[h]:
                        continue
                    try:
                        scs[h].add(i, first_row, rows)
                    except NonFinite:
                        c0 = first_row // T
                        raise UserError(f"non-finite activations (fp16 overflow?) at {h} in contexts "
                                        f"{c0}..{c0 + len(rows) // T} of {tokens_path}") from None
                if any(sc.due() for sc in scs.values()):
                    for sc in scs.values():  # together, so every hook checkpoints at the same batch
                        sc.flush(i + 1)
        except BaseException as e:
            failure.append(e)
            while q.get() is not None:  # drain so the producer never blocks
                pass

    thread = threading.Thread(target=writer, name="shard-writer", daemon=True)
    thread.start()
    bar = tqdm(total=(c_hi - c_lo) * T, initial=min(start * B, c_hi - c_lo) * T, unit="row", unit_scale=True,
               desc=f"activations rank {rank}" if rank else "activations", disable=rank != 0)
    stopped_at = None
    try:
        for i in range(start, n_batches):
            if failure:
                break
            if i > start and preempt.requested():
                stopped_at = i
                break
            lo, hi = bounds[i]
            starts, pos = plan.get(lo, hi)
            idx = torch.from_numpy(tokens[starts[:, None] + arange].astype(np.int64))
            if int(idx.max()) >= vocab:
                raise UserError(f"{tokens_path}: token id {int(idx.max())} >= the model's "
                                f"vocab_size {vocab}")
            got = forward(subject, idx, hooks)
            pos_t = torch.from_numpy(pos).to(subject.device)
            q.put((i, lo * T, {h: kept_rows(got[h], pos_t) for h in hooks}))  # gathered by the writer
            bar.update((hi - lo) * T)
    finally:
        q.put(None)
        thread.join()
        bar.close()
    if failure:
        raise failure[0]
    for sc in scs.values():
        sc.flush(n_batches if stopped_at is None else stopped_at)
    if stopped_at is not None:  # every batch before it is durable in the buckets
        raise preempt.Preempted(f"activations {split}", f"batch {stopped_at} of {n_batches} (pass 1)",
                                preempt.saved_hint(next(iter(scs.values())).work))


def forward(subject: Subject, idx: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """The hooks' values for one batch; running out of memory names the setting to lower."""
    try:
        return subject.capture(idx.to(subject.device, non_blocking=True), hooks)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "memory" not in str(e).lower():
            raise
        raise UserError(f"out of memory in the forward pass of {idx.shape[0]} contexts x {idx.shape[1]} "
                        f"tokens on {subject.device}: lower activations.batch_contexts (now "
                        f"{idx.shape[0]}) or activations.block_size") from e


def kept_rows(h: torch.Tensor, pos_t: torch.Tensor) -> Rows:
    """The kept positions of [b, L, d] as fp16 rows [b * T, d]. On the CPU every position is cast and
    the writer thread gathers the kept ones (with the scatter's own gather: one copy fewer on the
    forward's thread); elsewhere they are gathered on the device, fewer bytes over the bus."""
    b, L, d = h.shape
    flat = (pos_t + torch.arange(0, b * L, L, device=pos_t.device)[:, None]).reshape(-1)
    h = h.reshape(b * L, d)
    # torch's cast: IEEE round-to-nearest-even like numpy's, several times faster on the CPU
    if h.device.type == "cpu":
        return Rows(h.to(torch.float16).numpy(), flat.numpy())
    return Rows(h.index_select(0, flat).to(torch.float16).cpu().numpy())  # whole rows, not an index each
