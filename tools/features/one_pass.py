"""One pass over the contexts for every unit set: one forward per batch (stopping after the last hook
point the sets read), each set's running state (tools.features.scan.ScanState) updated, and, under
torchrun, each rank's run of the batches merged exactly (tools.features.merge)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tools.core import preempt
from tools.features.config import FeaturesConfig
from tools.features.merge import gather_merge
from tools.features.scan import ScanState

if TYPE_CHECKING:
    from tools.features.source import Inputs


def batch_ranges(n_ctx: int, batch: int, rank: int, world: int) -> list[int]:
    """The first context of each batch this rank scans: the single-process batches, split into `world`
    contiguous runs (rank 0 the first), so every batch is the same wherever it is scanned."""
    starts = list(range(0, n_ctx, batch))
    bounds = np.linspace(0, len(starts), world + 1).round().astype(int)
    return starts[bounds[rank]:bounds[rank + 1]]


def scan_sets(inps: list[Inputs], fc: FeaturesConfig, seed: int, device: str, negative: bool,
              dist: Any = None) -> tuple[list[tuple[ScanState, ScanState | None]], float]:
    """One pass over the contexts for every unit set in `inps` (one forward per batch, stopping after
    the last hook point they read): [(positive-side state, negative-side state or None)] and tokens/s.

    Under torchrun (`dist`: tools.core.distributed.Dist) each rank scans a contiguous run of the
    batches and the states are merged exactly (tools.features.merge), so every rank ends with the
    state one process would have. SIGTERM/SIGINT stop it between batches (`Preempted`): it keeps no
    resume state, so a rerun, with any number of ranks, scans from the start."""
    from tools.features.source import UnitActs, capture_sets

    inp0 = inps[0]
    n_ctx, T = inp0.n_ctx, inp0.T
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    cuda = device.startswith("cuda")

    def state(inp: Inputs) -> ScanState:
        units = inp.n_units * (2 if negative else 1)
        st = ScanState(units, min(fc.top_k, n_ctx), fc.per_bin, fc.n_random, device, seed,
                       n_ctx=n_ctx, candidates=fc.negative_candidates if fc.n_random else 0,
                       two_sided=negative, sync_free=torch.device(device).type != "cpu")
        st.T = T
        return st

    # a signed unit's two sides share one state: each (token, unit) entry is read once for both
    states = [state(inp) for inp in inps]
    acts = [UnitActs(inp, fc.dtype) for inp in inps]
    B = max(1, fc.batch_tokens // T)
    starts = batch_ranges(n_ctx, B, rank, world)
    t0 = time.perf_counter()
    units = sum(inp.n_units for inp in inps)
    bar = tqdm(starts, desc=f"scan ({units} units, {len(inps)} sets)", unit="batch", leave=False,
               disable=rank != 0)
    # the states are updated after each forward, not beside the next one: on the CPU the updates' loops
    # use every core themselves (tools/features/entries.py), and on CUDA the kernels queue without waiting
    for c0 in bar:
        c1 = min(c0 + B, n_ctx)
        idx = torch.from_numpy(np.asarray(inp0.tokens[c0 * T:c1 * T], dtype=np.int64)).view(c1 - c0, T)
        # on CUDA a copy that does not wait for the device
        idx = idx.pin_memory().to(device, non_blocking=True) if cuda else idx.to(device)
        got = capture_sets(inps, idx, fc.dtype)
        for inp, a, st in zip(inps, acts, states, strict=True):
            st.update(a.encode(got[inp.hook]), c0)
        del got
        if preempt.requested() and c1 < n_ctx:
            raise preempt.Preempted("features", f"context {c1} of {n_ctx} (scan)",
                                    "the scan keeps no resume state and nothing was written; run "
                                    "the same command again (with any number of ranks) to scan from "
                                    "the start")
    for st in states:
        st.check()
    if cuda:
        torch.cuda.synchronize()
    rate = n_ctx * T / max(time.perf_counter() - t0, 1e-9)
    if world > 1:
        # the first context of each rank's run (an empty run: where the next one starts)
        lo = [min(batch_ranges(n_ctx, B, r, world)[:1] + [c for q in range(r, world)
                                                         for c in batch_ranges(n_ctx, B, q, world)[:1]]
                  + [n_ctx]) for r in range(world)]
        states = [gather_merge(st, dist, lo) for st in states]
    sides = [st.halves() if negative else (st, None) for st in states]
    return sides, rate


def scan_sides(inp: Inputs, fc: FeaturesConfig, seed: int, device: str,
               negative: bool = False) -> tuple[ScanState, ScanState | None, float]:
    """One unit set, one process: (positive-side state, negative-side state or None, tokens/s)."""
    [(pos, neg)], rate = scan_sets([inp], fc, seed, device, negative)
    return pos, neg, rate


def scan(inp: Inputs, fc: FeaturesConfig, seed: int, device: str) -> tuple[ScanState, float]:
    """The positive side only: (state, tokens/s)."""
    pos, _, rate = scan_sides(inp, fc, seed, device)
    return pos, rate
