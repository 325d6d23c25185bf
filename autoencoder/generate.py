"""Model -> activation shards: `python -m autoencoder.generate run_dir=... [activations.split=val]`.

Samples random contexts from `data_dir/<data.name>/<split>.bin`, runs the subject (transformer.subject:
our GPT or a Hugging Face LM) only up to the last hooked layer, reading every hook point of
`activations.hook` (one kind or a list, e.g. [mlp_in, mlp_out] for a transcoder) x
`activations.layers` in one forward, keeps `tokens_per_context` random positions of each context
(200 in Anthropic's "Towards Monosemanticity"), and writes `run_dir/activations/<split>/` (one hook
point) or `run_dir/activations/<split>/<hook>/` (several; row i of every hook's shards is the same
token, and their manifests share `rows_key`: autoencoder.paired.check_paired). Layout in
docs/formats.md.

Rows must come out shuffled across contexts (a batch of one context's tokens is a correlated,
poor gradient), yet the full run is terabytes, so shuffling happens in two passes with RAM bounded
by about one shard (autoencoder.scatter):
  1. scatter: each row goes to a uniformly random shard's bucket file (appended in large writes);
  2. permute: each bucket is loaded alone, permuted, and written as a `.npy` shard with its sha256.
Everything is a function of the seed (contexts, positions, scatter, permutations), so a killed run
resumes: pass 1 from its last checkpoint (buckets truncated to the checkpointed sizes), pass 2 at
the first shard not yet written. When a rank's shards fit in `activations.in_ram_gb` (default: half
the available RAM), the same places are known up front and each row goes straight to its place in
memory-mapped shard files instead (autoencoder.in_ram): no bucket files, the same bytes.
`resample.npy`, a uniform sample of rows for neuron resampling, is collected during pass 1 so the
trainer never rereads the shards for it.

Under `torchrun` every rank takes a contiguous range of the contexts and writes its own shards
(and part of the resampling subset); rank 0 writes the one manifest. The output folder must be on
a file system every rank sees.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from autoencoder import shard_check, shard_write
from autoencoder.config import ActivationsConfig
from autoencoder.in_ram import InRamScatter
from autoencoder.scatter import SPLITS, ContextPlan, Scatter, batch_bounds, pass1, resample_indices
from tools.core import guard
from tools.core.config import UserError, output_fields, resolve_device, stage_main
from tools.core.distributed import Dist
from tools.core.files import config_hash, read_json, write_json
from tools.core.layout import RunLayout
from tools.core.memory import available_ram
from tools.core.stage import Stage
from transformer.data import open_tokens, token_dir
from transformer.subject import SubjectSpec, hook_kind, hook_point
from transformer.subject_load import load_subject, subject_spec


def n_contexts(a: ActivationsConfig) -> int:
    return a.n_contexts()


# ------------------------------------------------------------------------------------ inputs


@dataclass
class Inputs:
    spec: SubjectSpec  # the subject, described without loading its weights
    hooks: list[str]  # hook points written, one shard folder each
    tokens_path: Path
    token_dtype: np.dtype
    n_tokens: int
    context_len: int


def _inputs(cfg: DictConfig, a: ActivationsConfig) -> Inputs:
    spec = subject_spec(cfg)
    layers = list(range(spec.n_layers)) if a.layers == "all" else a.layers
    spec.check_layers(layers, "activations.layers")
    spec.check_kinds(a.kinds(), "activations.hook")
    model_block = spec.max_context
    default = int(spec.extra.get("default_context") or model_block)
    ctx = default if a.block_size is None else min(a.block_size, model_block)
    if a.tokens_per_context > ctx:
        raise UserError(f"config `activations.tokens_per_context`={a.tokens_per_context} exceeds the "
                        f"context length {ctx}")
    tokens_path = token_dir(cfg) / f"{a.split}.bin"
    if not tokens_path.is_file():
        raise UserError(f"tokens not found: {tokens_path} (run transformer.prepare first)")
    meta_path = tokens_path.parent / "meta.json"
    spec.check_tokens(read_json(meta_path) if meta_path.is_file() else None, meta_path)
    tokens = open_tokens(tokens_path.parent, a.split)
    dtype, n = tokens.dtype, len(tokens)
    if n < ctx:
        raise UserError(f"{tokens_path}: {n} tokens, fewer than one context of {ctx}")
    hooks = [hook_point(kind, layer) for layer in layers for kind in a.kinds()]
    return Inputs(spec, hooks, tokens_path, dtype, n, ctx)


def _data_id(inp: Inputs) -> dict[str, Any]:
    meta = inp.tokens_path.parent / "meta.json"
    return {"path": str(inp.tokens_path), "tokens": inp.n_tokens,
            "meta_hash": config_hash(read_json(meta)) if meta.is_file() else None}


def output_hash(cfg: DictConfig, a: ActivationsConfig, inp: Inputs, hook: str) -> str:
    """What one hook's shards depend on (not the world size, nor the other hooks written with it)."""
    return config_hash({"activations": output_fields(a), "hook": hook, "contexts": n_contexts(a),
                        "seed": int(cfg.seed),
                        "model": inp.spec.identity, "data": _data_id(inp), "context_len": inp.context_len})


def rows_key(cfg: DictConfig, a: ActivationsConfig, inp: Inputs, world: int) -> str:
    """What decides which token each row of a shard folder is: `output_hash` without the hook point,
    with the world size (each rank scatters its own rows). Folders with equal keys are row-paired."""
    return config_hash({"activations": output_fields(a), "contexts": n_contexts(a), "seed": int(cfg.seed),
                        "model": inp.spec.identity, "data": _data_id(inp), "context_len": inp.context_len,
                        "world_size": world})


def out_dir(cfg: DictConfig, split: str) -> Path:
    return RunLayout.of(cfg).activations_split(split)


def hook_dirs(cfg: DictConfig, a: ActivationsConfig, inp: Inputs) -> dict[str, Path]:
    """One hook point: the split folder itself; several: one subfolder per hook (RunLayout)."""
    return RunLayout.of(cfg).activation_hook_dirs(a.split, inp.hooks)


class ActivationsStage(Stage):
    """Tokens + subject -> `run_dir/activations/<split>/[<hook>/]` (one shard folder per hook point)."""

    name, what, key, schema = "autoencoder.generate", "activation directory", "activations", ActivationsConfig
    marker = shard_check.MANIFEST

    @functools.cached_property
    def inp(self) -> Inputs:
        return _inputs(self.cfg, self.c)

    def output_dir(self) -> Path:
        return out_dir(self.cfg, self.c.split)

    def output_hash(self, hook: str | None = None) -> str:
        """What one hook's shards depend on (`output_hash` below); the first hook's by default."""
        return output_hash(self.cfg, self.c, self.inp, hook or self.inp.hooks[0])

    def done(self) -> bool:
        """Every hook's manifest complete and current, its shards (and resample.npy) present."""
        a = self.c
        try:
            inp = self.inp
            for hook, directory in hook_dirs(self.cfg, a, inp).items():
                m = shard_check.read_manifest(directory)
                if m.get("config_hash") != output_hash(self.cfg, a, inp, hook):
                    return False
                for e in m["shards"]:
                    shard_check.check_shard(directory, e, int(m["d_in"]))
                if a.resample_rows and not (directory / shard_check.RESAMPLE).is_file():
                    return False
        except UserError:
            return False
        return True

    def verify_inputs(self) -> None:
        """Sealed model and tokens intact."""
        inp = self.inp
        if inp.spec.identity.get("kind") == "gpt":
            guard.verify_sealed(inp.spec.identity["path"], ["model.safetensors"], "transformer")
        guard.verify_sealed(inp.tokens_path.parent, [inp.tokens_path.name], "token")

    def guard(self) -> None:
        """A finished hook folder is replaced only with overwrite; an unfinished one is resumed or redone."""
        self.verify_inputs()
        for hook, directory in hook_dirs(self.cfg, self.c, self.inp).items():
            new = self.output_hash(hook)
            manifest = directory / shard_check.MANIFEST
            m = read_json(manifest) if manifest.is_file() else {}
            old = m.get("config_hash") if m.get("complete") is True else new
            guard.prepare_output(directory, self.what, marker=shard_check.MANIFEST, old=old, new=new,
                                 overwrite=self.overwrite())

    def finished(self, result: dict[str, Any]) -> bool:
        return False  # each shard carries its sha256 in the manifest

    def run(self) -> dict[str, Any]:
        self.inp  # noqa: B018 - bad inputs are refused before the lock is taken
        return super().run()

    def work(self) -> dict[str, Any]:
        dist = Dist.start(backend="gloo")  # coordination only: shard lists and barriers
        try:
            return _run(self.cfg, self.c, self.inp, dist)
        finally:
            dist.close()


def done(cfg: DictConfig) -> bool:
    """True when every hook's manifest is complete, matches config + model + data, and its shards exist."""
    return ActivationsStage(cfg).done()


def run(cfg: DictConfig) -> dict[str, Any]:
    return ActivationsStage(cfg).run()


def _run(cfg: DictConfig, a: ActivationsConfig, inp: Inputs, dist: Dist) -> dict[str, Any]:
    from tqdm import tqdm

    t0 = time.perf_counter()
    seed, dirs = int(cfg.seed), hook_dirs(cfg, a, inp)
    rank, world = dist.rank, dist.world
    log = print if rank == 0 else (lambda *_a, **_k: None)
    C, T = n_contexts(a), a.tokens_per_context
    total_rows = C * T
    # contiguous context ranges and shard-index ranges per rank
    c_bounds = [C * r // world for r in range(world + 1)]
    shard_counts = [-(-(c_bounds[r + 1] - c_bounds[r]) * T // a.rows_per_shard) for r in range(world)]
    first_shard = int(np.sum(shard_counts[:rank]))
    c_lo, c_hi, S = c_bounds[rank], c_bounds[rank + 1], shard_counts[rank]

    if all(dist.gather(done(cfg))):  # every rank decides, so none waits at a barrier alone
        log(f"activations {a.split}: {out_dir(cfg, a.split)} is complete for this config, nothing to do")
        return _summaries({h: (read_json(d / shard_check.MANIFEST), d) for h, d in dirs.items()}, 0.0)
    device = dist.device(resolve_device(str(cfg.device)))
    subject = load_subject(cfg, device, inp.spec)
    widths = {h: subject.width(h) for h in dirs}
    key = rows_key(cfg, a, inp, world)
    headers = {h: {"d_in": widths[h], "dtype": shard_check.DTYPE, "hook_name": h, "hook": hook_kind(h),
                   "layer": int(h.split(".")[1]), "model": inp.spec.identity, "split": a.split,
                   "contexts": C, "tokens_per_context": T, "block_size": inp.context_len,
                   "rows_per_shard": a.rows_per_shard, "total_rows": total_rows, "seed": seed,
                   "config_hash": output_hash(cfg, a, inp, h), "rows_key": key, "data": _data_id(inp),
                   "world_size": world}
               for h in dirs}
    dist.barrier()
    if rank == 0:  # nothing may read a half-rewritten directory as complete
        for h, directory in dirs.items():
            shard_write.write_manifest(directory, {**headers[h], "shards": [], "complete": False})
    dist.barrier()

    t_data, cpu_data = time.perf_counter(), time.process_time()  # after the one-off start: checks, loading
    res_all = resample_indices(seed, a.split, total_rows, a.resample_rows)
    lo, hi = np.searchsorted(res_all, [c_lo * T, c_hi * T])
    entries: dict[str, list[dict[str, Any]]] = {h: [] for h in dirs}
    timing: dict[str, float] = {}
    in_ram = (c_hi - c_lo) * T * sum(widths.values()) * 2 <= in_ram_budget(a)
    shuffle = "in_ram" if in_ram else "two_pass"
    if S > 0:
        batch_rows = [(hi - lo) * T for lo, hi in batch_bounds(c_lo, c_hi, a.batch_contexts)]

        def scatter(h: str, directory: Path) -> Scatter:
            key = config_hash({"key": headers[h]["config_hash"], "rank": rank, "world": world,
                               "in_ram": in_ram})
            args = (directory / f".work-rank{rank:03d}", key, S, widths[h], a.rows_per_shard * widths[h] * 2,
                    res_all[lo:hi], seed, a.split, rank)
            return InRamScatter(*args, batch_rows=batch_rows) if in_ram else Scatter(*args)

        scs = {h: scatter(h, d) for h, d in dirs.items()}
        todo = {h: sc for h, sc in scs.items() if sc.state["pass"] == 1}
        if todo:
            t1 = time.perf_counter()
            plan = ContextPlan(seed, a.split, inp.n_tokens, inp.context_len, T)
            pass1(subject, todo, plan, inp.tokens_path, c_lo=c_lo, c_hi=c_hi, batch_contexts=a.batch_contexts,
                  rank=rank, tqdm=tqdm)
            timing["pass1_s"] = time.perf_counter() - t1
            for sc in todo.values():
                sc.state["pass"] = 2
                write_json(sc.progress_path, sc.state)
        del subject
        t2 = time.perf_counter()
        for h, sc in scs.items():
            entries[h] = sc.pass2(first_shard, dirs[h], tqdm)
        timing["pass2_s"] = time.perf_counter() - t2

    gathered = dist.gather(entries)
    if rank == 0:
        for h, directory in dirs.items():
            _finish(directory, headers[h], all_entries=[e for part in gathered for e in part[h]],
                    res_all=res_all, has_shards=[bool(n) for n in shard_counts], seed=seed, split=a.split)
    dist.barrier()
    for directory in dirs.values():
        shutil.rmtree(directory / f".work-rank{rank:03d}", ignore_errors=True)
    seconds = time.perf_counter() - t0
    timing["rows_s"], timing["rows_cpu_s"] = time.perf_counter() - t_data, time.process_time() - cpu_data
    out = _summaries({h: (read_json(d / shard_check.MANIFEST), d) for h, d in dirs.items()}, seconds)
    out.update({k: round(v, 3) for k, v in timing.items()})
    out["shuffle"] = shuffle
    log(f"activations {a.split}: wrote {out['rows']:,} rows x {'/'.join(map(str, widths.values()))} for "
        f"{len(dirs)} hook point(s) ({', '.join(dirs)}) in {out['shards']} shards ({out['gb']:.3g} GB, "
        f"shuffled {'in RAM' if in_ram else 'in two passes'}) "
        f"+ resample.npy ({len(res_all):,} rows each) to {out_dir(cfg, a.split)} in {seconds:.1f}s")
    return out


def in_ram_budget(a: ActivationsConfig) -> float:
    """Bytes of shards a rank may shuffle in RAM: `in_ram_gb`, or half the available RAM shared by the
    ranks on this machine."""
    if a.in_ram_gb is not None:
        return a.in_ram_gb * 1e9
    return 0.5 * available_ram(default=0.0) / int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def _finish(directory: Path, header: dict[str, Any], *, all_entries: list[dict[str, Any]],
            res_all: np.ndarray, has_shards: list[bool], seed: int, split: str) -> None:
    """Rank 0, one hook: resample.npy from every rank's part, stale shards dropped, the manifest."""
    d, n_res = int(header["d_in"]), int(len(res_all))
    res_sha = None
    if n_res:
        paths = [directory / f".work-rank{r:03d}" / "resample.npy" for r in range(len(has_shards))]
        parts = [np.load(p, mmap_mode="r") for r, p in enumerate(paths) if has_shards[r] and p.is_file()]
        res = np.concatenate(parts) if parts else np.zeros((0, d), np.float16)
        del parts
        if len(res) != n_res:
            raise UserError(f"resampling parts in {directory} hold {len(res)} rows, expected {n_res}")
        # in context order so far: shuffle, so any prefix of the file is a uniform sample too
        perm = np.random.default_rng([seed, SPLITS.index(split), 4]).permutation(n_res)
        step = max(1, (1 << 24) // (d * 2))
        try:
            rows = (res[perm[i:i + step]] for i in range(0, n_res, step))
            res_sha = shard_write.write_shard(directory / shard_check.RESAMPLE, rows, n_res, d)["sha256"]
        except OSError as e:
            raise UserError(f"writing {directory / shard_check.RESAMPLE} failed ({e}); "
                            "rerun to resume") from e
        del res
    else:
        (directory / shard_check.RESAMPLE).unlink(missing_ok=True)
    listed = {e["file"] for e in all_entries}
    for stale in directory.glob("shard_*.npy"):  # from an earlier, different config
        if stale.name not in listed:
            stale.unlink()
    shard_write.write_manifest(directory, {**header, "total_rows": int(sum(e["rows"] for e in all_entries)),
                                           "shards": all_entries, "resample_rows": n_res,
                                           "resample_sha256": res_sha, "complete": True})


def _summary(m: dict[str, Any], directory: Path, seconds: float) -> dict[str, Any]:
    rows = int(m["total_rows"])
    return {"split": m.get("split"), "dir": str(directory), "rows": rows, "shards": len(m["shards"]),
            "d_in": int(m["d_in"]), "contexts": m.get("contexts"), "gb": rows * int(m["d_in"]) * 2 / 1e9,
            "resample_rows": m.get("resample_rows"), "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None}


def _summaries(found: dict[str, tuple[dict[str, Any], Path]], seconds: float) -> dict[str, Any]:
    """One hook: today's summary. Several: rows per hook, shards and GB summed, each hook's own below."""
    each = {h: _summary(m, d, seconds) for h, (m, d) in found.items()}
    if len(each) == 1:
        return next(iter(each.values()))
    first = next(iter(each.values()))
    return {**first, "dir": str(Path(first["dir"]).parent), "d_in": None,
            "shards": sum(s["shards"] for s in each.values()), "gb": sum(s["gb"] for s in each.values()),
            "hooks": each}


main = stage_main(run)

if __name__ == "__main__":
    main()
