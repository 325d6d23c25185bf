"""Model -> activation shards: `python -m autoencoder.generate run_dir=... [activations.split=val]`.

Samples random contexts from `data_dir/<data.name>/<split>.bin`, runs the model only up to the
hooked MLP (`model.mlp_acts`), keeps `tokens_per_context` random positions of each context (200 in
Anthropic's "Towards Monosemanticity"), and writes `run_dir/activations/<split>/` (docs/formats.md).

Rows must come out shuffled across contexts (a batch of one context's tokens is a correlated,
poor gradient), yet the full run is terabytes, so shuffling happens in two passes with RAM bounded
by about one shard:
  1. scatter: each row goes to a uniformly random shard's bucket file (appended in large writes);
  2. permute: each bucket is loaded alone, permuted, and written as a `.npy` shard with its sha256.
Everything is a function of the seed (contexts, positions, scatter, permutations), so a killed run
resumes: pass 1 from its last checkpoint (buckets truncated to the checkpointed sizes), pass 2 at
the first shard not yet written. `resample.npy`, a uniform sample of rows for neuron resampling,
is collected during pass 1 so the trainer never rereads the shards for it.

Under `torchrun` every rank takes a contiguous range of the contexts and writes its own shards
(and part of the resampling subset); rank 0 writes the one manifest. The output folder must be on
a file system every rank sees.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from autoencoder import shards
from transformer import guard
from transformer.config import UserError, resolve_device, stage_main, typed
from transformer.files import config_hash, read_json, sha256_file, write_json

SPLITS = ("train", "val")
CHUNK = 1024  # contexts drawn per RNG stream, so the sample does not depend on batch size or ranks
WORK_FORMAT = "monosemantic.activations-work/1"


@dataclass
class ActivationsConfig:
    """The `activations` config section (conf/activations/default.yaml documents every key)."""

    split: str = "train"  # train | val: which token file to sample contexts from
    contexts: int = 250_000  # contexts sampled for split=train
    val_contexts: int = 5_000  # contexts sampled for split=val
    tokens_per_context: int = 200  # random positions kept per context (Anthropic 2023: 200)
    block_size: int | None = None  # context length: at most this; null -> the model's block_size
    layer: int = 0  # which block's MLP
    rows_per_shard: int = 1_048_576  # ~1 GiB per shard at d_in 512; also the pass-1 RAM budget
    resample_rows: int = 819_200  # rows of resample.npy (Anthropic 2023: 819,200); 0 = none
    batch_contexts: int = 64  # contexts per forward pass


def check_config(a: ActivationsConfig) -> ActivationsConfig:
    if a.split not in SPLITS:
        raise UserError(f"config `activations.split`={a.split!r}: expected train or val")
    for key in ("contexts", "val_contexts", "tokens_per_context", "rows_per_shard", "batch_contexts"):
        if getattr(a, key) < 1:
            raise UserError(f"config `activations.{key}`={getattr(a, key)}: expected an integer >= 1")
    if a.resample_rows < 0 or a.layer < 0:
        key = "resample_rows" if a.resample_rows < 0 else "layer"
        raise UserError(f"config `activations.{key}`={getattr(a, key)}: expected an integer >= 0")
    if a.block_size is not None and a.block_size < 1:
        raise UserError(f"config `activations.block_size`={a.block_size}: expected null or >= 1")
    return a


def n_contexts(a: ActivationsConfig) -> int:
    return a.contexts if a.split == "train" else a.val_contexts


# ------------------------------------------------------------------------------------ inputs


@dataclass
class Inputs:
    model_dir: Path
    model_info: dict[str, Any]  # manifest `model`: path, config_hash, weights_sha256
    model_cfg: dict[str, Any]
    tokens_path: Path
    n_tokens: int
    context_len: int
    d_in: int


def _inputs(cfg: DictConfig, a: ActivationsConfig) -> Inputs:
    model_dir = Path(str(cfg.run_dir)) / "transformer"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"transformer config not found: {model_dir / 'config.json'} "
                        "(run transformer.train first)")
    meta = read_json(model_dir / "config.json", "transformer config")
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"transformer weights not found: {weights} (run transformer.train first)")
    mcfg = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(mcfg, dict) or "block_size" not in mcfg or "n_embd" not in mcfg:
        raise UserError(f"{model_dir / 'config.json'}: no valid `model` section")
    model_block = int(mcfg["block_size"])
    ctx = model_block if a.block_size is None else min(a.block_size, model_block)
    if a.tokens_per_context > ctx:
        raise UserError(f"config `activations.tokens_per_context`={a.tokens_per_context} exceeds the "
                        f"context length {ctx}")
    if a.layer >= int(mcfg.get("n_layer", 1)):
        raise UserError(f"config `activations.layer`={a.layer}: the model has "
                        f"{mcfg.get('n_layer', 1)} layers")
    tokens_path = Path(str(cfg.data_dir)) / str(cfg.data.name) / f"{a.split}.bin"
    if not tokens_path.is_file():
        raise UserError(f"tokens not found: {tokens_path} (run transformer.prepare first)")
    size = tokens_path.stat().st_size
    if size % 2:
        raise UserError(f"{tokens_path}: {size} bytes is not a whole number of uint16 tokens")
    if size // 2 < ctx:
        raise UserError(f"{tokens_path}: {size // 2} tokens, fewer than one context of {ctx}")
    d_in = int(mcfg.get("mlp_ratio", 4)) * int(mcfg["n_embd"])
    info = {"path": str(model_dir), "config_hash": config_hash(meta), "weights_sha256": sha256_file(weights)}
    return Inputs(model_dir, info, mcfg, tokens_path, size // 2, ctx, d_in)


def _data_id(inp: Inputs) -> dict[str, Any]:
    meta = inp.tokens_path.parent / "meta.json"
    return {"path": str(inp.tokens_path), "tokens": inp.n_tokens,
            "meta_hash": config_hash(read_json(meta)) if meta.is_file() else None}


def output_hash(cfg: DictConfig, a: ActivationsConfig, inp: Inputs) -> str:
    """What the shards' content depends on (not the world size: any world's shards serve)."""
    keep = {k: v for k, v in asdict(a).items() if k not in ("contexts", "val_contexts")}
    return config_hash({"activations": keep, "contexts": n_contexts(a), "seed": int(cfg.seed),
                        "model": inp.model_info, "data": _data_id(inp), "context_len": inp.context_len})


def out_dir(cfg: DictConfig, split: str) -> Path:
    return Path(str(cfg.run_dir)) / "activations" / split


def done(cfg: DictConfig) -> bool:
    """True when the split's manifest is complete, matches config + model + data, and its shards exist."""
    a = check_config(typed(cfg.activations, ActivationsConfig, "activations"))
    directory = out_dir(cfg, a.split)
    try:
        m = shards.read_manifest(directory)
        inp = _inputs(cfg, a)
        if m.get("config_hash") != output_hash(cfg, a, inp):
            return False
        for e in m["shards"]:
            shards.check_shard(directory, e, int(m["d_in"]))
    except UserError:
        return False
    return a.resample_rows == 0 or (directory / shards.RESAMPLE).is_file()


# ------------------------------------------------------------------------------------ sampling


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


# ------------------------------------------------------------------------------------ pass 1


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
            for k, rows in enumerate(self.bucket_rows):  # drop anything written after the checkpoint
                p = self.bucket(k)
                want = rows * d_in * 2
                if want == 0:
                    p.unlink(missing_ok=True)
                    continue
                if not p.is_file() or p.stat().st_size < want:
                    raise UserError(f"{p}: shorter than its checkpoint ({want} bytes); "
                                    f"delete {work} to restart")
                os.truncate(p, want)
        res_path = work / "resample.npy"
        if len(res_ids) and not res_path.is_file():
            shape = (len(res_ids), d_in)
            np.lib.format.open_memmap(res_path, mode="w+", dtype=np.float16, shape=shape).flush()
        self.res = np.load(res_path, mmap_mode="r+") if len(res_ids) else None

    def bucket(self, k: int) -> Path:
        return self.work / f"bucket_{k:05d}.f16"

    def add(self, batch_index: int, first_row: int, x: np.ndarray) -> None:
        """Scatter one batch (rows `first_row ...` in global order) and keep its resample rows."""
        if self.res is not None:
            lo, hi = np.searchsorted(self.res_ids, [first_row, first_row + len(x)])
            if hi > lo:
                self.res[lo:hi] = x[self.res_ids[lo:hi] - first_row]
        rng = np.random.default_rng([self.seed, self.split_id, 3, self.rank, batch_index])
        dest = rng.integers(0, self.S, size=len(x))
        order = np.argsort(dest, kind="stable")
        counts = np.bincount(dest, minlength=self.S)
        xs = x[order]
        ends = np.cumsum(counts)
        for k in np.flatnonzero(counts):
            self.buffers[k].append(xs[ends[k] - counts[k]:ends[k]])
        self.buffered += x.nbytes

    def flush(self, batches_done: int) -> None:
        """Append every buffer to its bucket, make it durable, then checkpoint."""
        try:
            for k, parts in enumerate(self.buffers):
                if not parts:
                    continue
                block = np.concatenate(parts) if len(parts) > 1 else parts[0]
                with open(self.bucket(k), "ab") as f:
                    f.write(memoryview(np.ascontiguousarray(block)).cast("B"))
                    f.flush()
                    os.fsync(f.fileno())
                self.bucket_rows[k] += len(block)
                self.buffers[k] = []
            if self.res is not None:
                self.res.flush()
        except OSError as e:
            raise UserError(f"writing activation buckets in {self.work} failed ({e}); nothing complete "
                            "was lost: free space and rerun to resume from the last checkpoint") from e
        self.buffered = 0
        self.state.update(batches=batches_done, bucket_rows=self.bucket_rows)
        write_json(self.progress_path, self.state)


# ------------------------------------------------------------------------------------ run


def _dist() -> tuple[int, int, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    own = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # coordination only: shard lists and barriers
        own = True
    return dist.get_rank(), dist.get_world_size(), own


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def run(cfg: DictConfig) -> dict[str, Any]:
    a = check_config(typed(cfg.activations, ActivationsConfig, "activations"))
    inp = _inputs(cfg, a)
    with guard.output_lock(out_dir(cfg, a.split), "autoencoder.generate"):
        _guard(cfg, a, inp)
        rank, world, own_pg = _dist()
        try:
            return _run(cfg, a, inp, rank, world)
        finally:
            if own_pg:
                import torch.distributed as dist

                dist.destroy_process_group()


def _guard(cfg: DictConfig, a: ActivationsConfig, inp: Inputs) -> None:
    """Intact inputs (sealed model and tokens); a finished directory is replaced only with overwrite."""
    guard.verify_sealed(inp.model_dir, ["model.safetensors"], "transformer")
    guard.verify_sealed(inp.tokens_path.parent, [inp.tokens_path.name], "token")
    directory, new = out_dir(cfg, a.split), output_hash(cfg, a, inp)
    m = read_json(directory / shards.MANIFEST) if (directory / shards.MANIFEST).is_file() else {}
    old = m.get("config_hash") if m.get("complete") is True else new  # unfinished: resumed or redone
    guard.prepare_output(directory, "activation directory", marker=shards.MANIFEST, old=old, new=new,
                         overwrite=bool(cfg.get("overwrite", False)))


def _run(cfg: DictConfig, a: ActivationsConfig, inp: Inputs, rank: int, world: int) -> dict[str, Any]:
    from tqdm import tqdm

    from transformer.model import hook_name, load_model

    t0 = time.perf_counter()
    seed, directory = int(cfg.seed), out_dir(cfg, a.split)
    key = output_hash(cfg, a, inp)
    log = print if rank == 0 else (lambda *_a, **_k: None)
    C, T, d = n_contexts(a), a.tokens_per_context, inp.d_in
    total_rows = C * T
    # contiguous context ranges and shard-index ranges per rank
    c_bounds = [C * r // world for r in range(world + 1)]
    shard_counts = [-(-(c_bounds[r + 1] - c_bounds[r]) * T // a.rows_per_shard) for r in range(world)]
    first_shard = int(np.sum(shard_counts[:rank]))
    c_lo, c_hi, S = c_bounds[rank], c_bounds[rank + 1], shard_counts[rank]

    header = {"d_in": d, "dtype": shards.DTYPE, "hook_name": hook_name(a.layer), "model": inp.model_info,
              "split": a.split, "contexts": C, "tokens_per_context": T, "block_size": inp.context_len,
              "rows_per_shard": a.rows_per_shard, "total_rows": total_rows, "seed": seed,
              "config_hash": key, "data": _data_id(inp), "world_size": world}
    if all(_gather(done(cfg), world)):  # every rank decides, so none waits at a barrier alone
        log(f"activations {a.split}: {directory} is complete for this config, nothing to do")
        return _summary(read_json(directory / shards.MANIFEST), directory, 0.0)
    _barrier(world)
    if rank == 0:  # nothing may read a half-rewritten directory as complete
        shards.write_manifest(directory, {**header, "shards": [], "complete": False})
    _barrier(world)

    res_all = resample_indices(seed, a.split, total_rows, a.resample_rows)
    lo, hi = np.searchsorted(res_all, [c_lo * T, c_hi * T])
    work = directory / f".work-rank{rank:03d}"
    budget = a.rows_per_shard * d * 2
    entries: list[dict[str, Any]] = []
    timing: dict[str, float] = {}
    if S > 0:
        work_key = config_hash({"key": key, "rank": rank, "world": world})
        sc = Scatter(work, work_key, S, d, budget, res_all[lo:hi], seed, a.split, rank)
        if sc.state["pass"] == 1:
            device = resolve_device(str(cfg.device))
            if device == "cuda" and world > 1:
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            model = load_model(inp.model_dir, device)
            t1 = time.perf_counter()
            _pass1(a, inp, model, device, sc, c_lo, c_hi, seed, rank, tqdm)
            timing["pass1_s"] = time.perf_counter() - t1
            sc.state["pass"] = 2
            write_json(sc.progress_path, sc.state)
            del model
        t2 = time.perf_counter()
        entries = _pass2(sc, first_shard, directory, seed, a.split, rank, tqdm)
        timing["pass2_s"] = time.perf_counter() - t2

    all_entries = [e for part in _gather(entries, world) for e in part]
    n_res = int(len(res_all))
    if rank == 0:
        if n_res:
            paths = [directory / f".work-rank{r:03d}" / "resample.npy" for r in range(world)]
            parts = [np.load(p, mmap_mode="r") for r, p in enumerate(paths)
                     if shard_counts[r] and p.is_file()]
            res = np.concatenate(parts) if parts else np.zeros((0, d), np.float16)
            del parts
            if len(res) != n_res:
                raise UserError(f"resampling parts in {directory} hold {len(res)} rows, expected {n_res}")
            # in context order so far: shuffle, so any prefix of the file is a uniform sample too
            perm = np.random.default_rng([seed, SPLITS.index(a.split), 4]).permutation(n_res)
            step = max(1, (1 << 24) // (d * 2))
            try:
                res_sha = shards.write_shard(directory / shards.RESAMPLE,
                                             (res[perm[i:i + step]] for i in range(0, n_res, step)),
                                             n_res, d)["sha256"]
            except OSError as e:
                raise UserError(f"writing {directory / shards.RESAMPLE} failed ({e}); rerun to resume") from e
            del res
        else:
            res_sha = None
            (directory / shards.RESAMPLE).unlink(missing_ok=True)
        listed = {e["file"] for e in all_entries}
        for stale in directory.glob("shard_*.npy"):  # from an earlier, different config
            if stale.name not in listed:
                stale.unlink()
        manifest = {**header, "total_rows": int(sum(e["rows"] for e in all_entries)), "shards": all_entries,
                    "resample_rows": n_res, "resample_sha256": res_sha, "complete": True}
        shards.write_manifest(directory, manifest)
    _barrier(world)
    shutil.rmtree(work, ignore_errors=True)
    manifest = read_json(directory / shards.MANIFEST)
    seconds = time.perf_counter() - t0
    out = {**_summary(manifest, directory, seconds), **{k: round(v, 2) for k, v in timing.items()}}
    log(f"activations {a.split}: wrote {out['rows']:,} rows x {d} in {out['shards']} shards "
        f"({out['gb']:.3g} GB) + resample.npy ({n_res:,} rows) to {directory} in {seconds:.1f}s")
    return out


def _summary(m: dict[str, Any], directory: Path, seconds: float) -> dict[str, Any]:
    rows = int(m["total_rows"])
    return {"split": m.get("split"), "dir": str(directory), "rows": rows, "shards": len(m["shards"]),
            "d_in": int(m["d_in"]), "contexts": m.get("contexts"), "gb": rows * int(m["d_in"]) * 2 / 1e9,
            "resample_rows": m.get("resample_rows"), "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None}


def _pass1(a: ActivationsConfig, inp: Inputs, model, device: str, sc: Scatter, c_lo: int, c_hi: int,
           seed: int, rank: int, tqdm) -> None:
    """Forward passes on the main thread; scattering and disk writes on a writer thread."""
    T, B = a.tokens_per_context, a.batch_contexts
    plan = ContextPlan(seed, a.split, inp.n_tokens, inp.context_len, T)
    tokens = np.memmap(inp.tokens_path, dtype=np.uint16, mode="r")
    vocab = int(inp.model_cfg.get("vocab_size", 1 << 16))
    n_batches = -(-(c_hi - c_lo) // B)
    start = int(sc.state["batches"])
    arange = np.arange(inp.context_len, dtype=np.int64)
    q: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            while (item := q.get()) is not None:
                i, first_row, x = item
                if ((x.view(np.uint16) & 0x7C00) == 0x7C00).any():  # inf/nan: 8x faster than isfinite
                    raise UserError(f"non-finite activations (fp16 overflow?) in contexts "
                                    f"{first_row // T}..{first_row // T + len(x) // T} of {inp.tokens_path}")
                sc.add(i, first_row, x)
                if sc.buffered >= sc.budget:
                    sc.flush(i + 1)
        except BaseException as e:
            failure.append(e)
            while q.get() is not None:  # drain so the producer never blocks
                pass

    thread = threading.Thread(target=writer, name="shard-writer", daemon=True)
    thread.start()
    bar = tqdm(total=(c_hi - c_lo) * T, initial=min(start * B, c_hi - c_lo) * T, unit="row", unit_scale=True,
               desc=f"activations rank {rank}" if rank else "activations", disable=rank != 0)
    try:
        for i in range(start, n_batches):
            if failure:
                break
            lo, hi = c_lo + i * B, min(c_lo + (i + 1) * B, c_hi)
            starts, pos = plan.get(lo, hi)
            idx = torch.from_numpy(tokens[starts[:, None] + arange].astype(np.int64))
            if int(idx.max()) >= vocab:
                raise UserError(f"{inp.tokens_path}: token id {int(idx.max())} >= the model's "
                                f"vocab_size {vocab}")
            h = model.mlp_acts(idx.to(device, non_blocking=True), a.layer)  # [b, L, d]
            pos_t = torch.from_numpy(pos).to(h.device)
            rows = torch.gather(h, 1, pos_t[:, :, None].expand(-1, -1, h.shape[-1])).reshape(-1, h.shape[-1])
            if rows.is_cuda:  # convert on the device: half the bytes over the bus
                x = rows.to(torch.float16).cpu().numpy()
            else:  # numpy's F16C conversion is faster than torch's on CPU; same rounding (IEEE RNE)
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by the writer
                    x = rows.numpy().astype(np.float16)
            q.put((i, lo * T, x))
            bar.update(len(x))
    finally:
        q.put(None)
        thread.join()
        bar.close()
    if failure:
        raise failure[0]
    sc.flush(n_batches)


def _pass2(sc: Scatter, first_shard: int, directory: Path, seed: int, split: str, rank: int,
           tqdm) -> list[dict[str, Any]]:
    """Each bucket alone in RAM: permute, write as a shard (atomically), checkpoint, drop the bucket."""
    entries = []
    for k in tqdm(range(sc.S), desc="shuffle shards", unit="shard", disable=rank != 0):
        name = shards.shard_name(first_shard + k)
        entry = sc.state["shards"].get(str(k))
        path = directory / name
        if entry is not None and path.is_file():
            try:
                shards.check_shard(directory, entry, sc.d)
                entries.append(entry)
                continue
            except UserError:
                pass  # rewritten below if its bucket is still there
        rows = sc.bucket_rows[k]
        if rows == 0:
            continue
        bucket = sc.bucket(k)
        if not bucket.is_file() or bucket.stat().st_size != rows * sc.d * 2:
            raise UserError(f"{bucket}: missing or not {rows} rows, and {path} is not complete; "
                            f"delete {sc.work} and rerun to regenerate")
        x = np.fromfile(bucket, dtype=np.float16).reshape(rows, sc.d)
        perm = np.random.default_rng([seed, SPLITS.index(split), 5, rank, k]).permutation(rows)
        step = max(1, (1 << 24) // (sc.d * 2))
        try:
            entry = shards.write_shard(path, (x[perm[i:i + step]] for i in range(0, rows, step)), rows, sc.d)
        except OSError as e:
            raise UserError(f"writing {path} failed ({e}); completed shards are kept: free space and "
                            "rerun to resume at this shard") from e
        del x
        sc.state["shards"][str(k)] = entry
        write_json(sc.progress_path, sc.state)
        bucket.unlink()
        entries.append(entry)
    return entries


main = stage_main(run)

if __name__ == "__main__":
    main()
