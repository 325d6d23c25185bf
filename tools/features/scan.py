"""The streaming scan: per-unit running statistics over every scanned token, in one pass.

`ScanState` keeps, per unit, state whose size does not grow with the tokens scanned (see
tools/top_activations.py for what each part is). A signed unit's negative side is a second state
fed the negated activations, so bottom-k by min, bins below 0 and their negatives are the same
exact machinery as the positive side.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tools.core import preempt
from tools.core.config import UserError
from tools.features.config import HIST_BINS, FeaturesConfig
from tools.features.merge import gather_merge, two_sum

if TYPE_CHECKING:
    from tools.features.source import Inputs


@dataclass
class ScanState:
    """Per-unit running statistics; every tensor is O(units x (k + bins)), none grows with tokens."""

    n_units: int
    top_k: int
    per_bin: int
    n_random: int
    device: str
    seed: int
    nonneg: bool = False  # activations are never negative (SAE features): skips the f > 0 pass
    n_ctx: int = 0  # contexts the scan will see (candidates are drawn from 0 .. n_ctx - 1)
    candidates: int = 0  # candidate negative contexts whose per-unit max is kept
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        F, k, G, m, dev = self.n_units, self.top_k, HIST_BINS, self.per_bin, self.device
        inf = math.inf
        self.tensors = dict(
            total=torch.zeros(F, dtype=torch.float64, device=dev),
            # the rounding error of `total` (TwoSum), so the sum over batches is exact in any grouping
            total_lo=torch.zeros(F, dtype=torch.float64, device=dev),
            maxv=torch.zeros(F, device=dev),
            scale=torch.zeros(F, device=dev),  # R, a power of two > max; 0 until the unit first fires
            hist=torch.zeros(F, G, dtype=torch.int64, device=dev),
            top_v=torch.zeros(F, k, device=dev),
            top_c=torch.full((F, k), -1, dtype=torch.int64, device=dev),
            top_p=torch.zeros(F, k, dtype=torch.int64, device=dev),
            res_key=torch.full((F * G * m,), inf, device=dev),  # [unit, bin, slot] flattened
            res_act=torch.zeros(F * G * m, device=dev),
            res_tok=torch.zeros(F * G * m, dtype=torch.int64, device=dev),  # ctx * T + pos
            neg_key=torch.full((F, self.n_random), inf, device=dev),
            neg_c=torch.full((F, self.n_random), -1, dtype=torch.int64, device=dev),
            # candidate negatives: fixed-size rows (unused ones have ctx -1), O(candidates x units)
            cand_ctx=torch.full((self.candidates,), -1, dtype=torch.int64, device=dev),
            cand_max=torch.zeros(self.candidates, F, device=dev),
        )
        self._cand = candidate_contexts(self.n_ctx, self.candidates, self.seed)
        self.tensors["cand_ctx"][:len(self._cand)] = torch.from_numpy(self._cand).to(dev)
        self.gen = torch.Generator(device=dev).manual_seed(self.seed)

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    @torch.no_grad()
    def update(self, f: torch.Tensor, ctx0: int) -> None:
        """Fold in one batch of activations f [B, T, units] of contexts ctx0 .. ctx0 + B - 1."""
        s = self.tensors
        B, T, F = f.shape
        self.T = T
        f = f.float()
        # each batch draws from its own stream (a function of the seed and the batch's first context),
        # so the draws do not depend on which process scans which batches
        self.gen.manual_seed(batch_seed(self.seed, ctx0))
        cmax = f.amax(dim=1)  # [B, F]
        newmax = cmax.amax(0)
        if not torch.isfinite(newmax).all():
            raise UserError(f"non-finite activations in contexts {ctx0}..{ctx0 + B - 1} "
                            "(NaN/Inf in the model or SAE weights)")
        # running top-k of contexts by their max activation; the argmax position is looked up
        # only for the (few) contexts that enter a top-k; only units whose k-th best is beaten merge
        k = self.top_k
        cand = (newmax > s["top_v"][:, -1]).nonzero().squeeze(1)
        if cand.numel():
            # stable: among equal values the earlier context first (the order a merge of ranks keeps)
            tv, ti = torch.cat([s["top_v"][cand], cmax.index_select(1, cand).t()], 1).sort(
                dim=1, descending=True, stable=True)
            tv, ti = tv[:, :k], ti[:, :k]
            fresh, old = ti >= k, ti.clamp(max=k - 1)
            top_c = torch.where(fresh, ti - k + ctx0, s["top_c"][cand].gather(1, old))
            top_p = s["top_p"][cand].gather(1, old)
        # random non-firing contexts: bottom-n random keys over the contexts where the unit is silent
        if self.n_random:
            n = self.n_random
            key = torch.rand(B, F, generator=self.gen, device=f.device)
            key.masked_fill_(cmax > 0, math.inf)
            neg = (key.amin(0) < s["neg_key"][:, -1]).nonzero().squeeze(1)
            if neg.numel():
                nk, ni = torch.cat([s["neg_key"][neg], key.index_select(1, neg).t()], 1).sort(
                    dim=1, stable=True)
                nk, ni = nk[:, :n], ni[:, :n]
                kept = s["neg_c"][neg].gather(1, ni.clamp(max=n - 1))
                s["neg_c"][neg] = torch.where(ni >= n, ni - n + ctx0, kept)
                s["neg_key"][neg] = nk
        # candidate negatives in this batch: keep their per-unit max (the threshold is known at the end)
        i0, i1 = np.searchsorted(self._cand, [ctx0, ctx0 + B])
        if i1 > i0:
            rows_c = torch.from_numpy(self._cand[i0:i1] - ctx0).to(f.device)
            s["cand_max"][i0:i1] = cmax.index_select(0, rows_c)
        # firing tokens: counts, sums, histogram, per-bin samples
        flat = f.view(-1)
        # an SAE's f is >= 0, so its nonzeros are its firing tokens (one pass fewer than f > 0)
        lin = (flat.nonzero() if self.nonneg else (flat > 0).nonzero()).squeeze(1)
        acts = flat.index_select(0, lin)
        rows = torch.div(lin, F, rounding_mode="floor")
        cols = lin - rows * F
        # where each context's max is (for the contexts entering a top-k): found among the nonzeros
        bf = torch.div(rows, T, rounding_mode="floor") * F + cols
        at_max = (acts == cmax.view(-1).index_select(0, bf)).nonzero().squeeze(1)
        argpos = torch.zeros(B * F, dtype=torch.int64, device=f.device)
        argpos[bf.index_select(0, at_max)] = rows.index_select(0, at_max) % T
        if cand.numel():
            top_p = torch.where(fresh, argpos.view(B, F)[(ti - k).clamp(min=0), cand[:, None]], top_p)
            s["top_v"][cand], s["top_c"][cand], s["top_p"][cand] = tv, top_c, top_p
        two_sum(s["total"], s["total_lo"], torch.bincount(cols, weights=acts.double(), minlength=F))
        s["maxv"] = torch.maximum(s["maxv"], newmax)
        grow = (newmax >= s["scale"]) & (newmax > 0)
        if grow.any():
            above = torch.exp2(torch.floor(torch.log2(newmax.clamp_min(1e-30))) + 1)  # next power of 2 > max
            self._grow(grow.nonzero().squeeze(1), above)
        G = HIST_BINS
        b = (acts / s["scale"].index_select(0, cols) * G).long().clamp_(max=G - 1)
        group = cols * G + b
        s["hist"].view(-1).add_(torch.bincount(group, minlength=F * G))
        n = acts.shape[0]
        # one uniform draw gives both the slot (integer part of u*m) and the key (fractional part)
        u = torch.rand(n, generator=self.gen, device=f.device) * self.per_bin
        slot = u.long().clamp_(max=self.per_bin - 1)
        self._sample(group * self.per_bin + slot, u - slot, acts, ctx0 * T + rows)

    def _grow(self, units: torch.Tensor, scale: torch.Tensor) -> None:
        """Raise R to `scale` (a power of two > the new max; [all units]), merging bins 2^d at a time
        (exact: a value's bin at R / 2^d, shifted right by d, is its bin at R)."""
        s, G, m = self.tensors, HIST_BINS, self.per_bin
        old = s["scale"][units]
        target = scale[units]  # [units]: the new R of each unit (a power of two)
        fresh = old == 0
        shift = torch.where(fresh, torch.zeros_like(old), torch.log2(target / old.clamp_min(1e-30)))
        shift = shift.round().long().clamp_(min=0, max=62)
        s["scale"][units] = torch.where(fresh, target, old * torch.exp2(shift.float()))
        F = self.n_units
        keys, acts, toks = (s[k].view(F, G, m) for k in ("res_key", "res_act", "res_tok"))
        for d in shift[shift > 0].clamp(max=int(math.log2(G))).unique().tolist():
            # bins merge 2^d at a time (bin i -> i >> d); slot s of a merged bin keeps the
            # smallest key among the merged bins' slot s, so it is still a uniform draw
            sel = units[(shift.clamp(max=int(math.log2(G))) == d)]
            n, g2, w = sel.numel(), G >> d, 1 << d
            h = s["hist"][sel].view(n, g2, w).sum(2)
            s["hist"][sel] = torch.cat([h, torch.zeros(n, G - g2, dtype=h.dtype, device=h.device)], 1)
            k, a, t = (x[sel].view(n, g2, w, m) for x in (keys, acts, toks))
            kmin, arg = k.min(2)
            arg = arg[:, :, None]
            pad = (n, G - g2, m)
            keys[sel] = torch.cat([kmin, torch.full(pad, math.inf, device=k.device)], 1)
            acts[sel] = torch.cat([a.gather(2, arg).squeeze(2), torch.zeros(pad, device=k.device)], 1)
            toks[sel] = torch.cat([t.gather(2, arg).squeeze(2),
                                   torch.zeros(pad, dtype=t.dtype, device=k.device)], 1)

    def _sample(self, slot: torch.Tensor, key: torch.Tensor, act: torch.Tensor, tok: torch.Tensor) -> None:
        """Each (unit, histogram bin) has m slots; every firing token goes to one slot at random and
        a slot keeps the token with the smallest random key sent to it. So each slot holds a
        uniform draw from its bin's tokens, the m slots hold distinct tokens, and every token of a
        bin is equally likely to be kept: a uniform sample, with scatter-min instead of a sort."""
        s = self.tensors
        if slot.numel() == 0:
            return
        # (one nonzero + index_select per filter: boolean-mask indexing would redo the nonzero per array)
        keep = (key < s["res_key"].index_select(0, slot)).nonzero().squeeze(1)  # few, once slots fill
        slot, key, act, tok = (x.index_select(0, keep) for x in (slot, key, act, tok))
        s["res_key"].scatter_reduce_(0, slot, key, reduce="amin", include_self=True)
        won = (key == s["res_key"].index_select(0, slot)).nonzero().squeeze(1)
        slot = slot.index_select(0, won)
        s["res_act"][slot] = act.index_select(0, won)
        s["res_tok"][slot] = tok.index_select(0, won)

    @property
    def count(self) -> torch.Tensor:
        """Firing tokens per unit (the histogram is exact, so its total is the count)."""
        return self.tensors["hist"].sum(1)

    def numpy(self) -> dict[str, np.ndarray]:
        out = {k: v.cpu().numpy() for k, v in self.tensors.items() if k != "total_lo"}
        out["total"] = (self.tensors["total"] + self.tensors["total_lo"]).cpu().numpy()
        out["count"] = self.count.cpu().numpy()
        out["T"] = np.array(getattr(self, "T", 1))
        out["seed"] = np.array(self.seed)
        return out


def candidate_contexts(n_ctx: int, n: int, seed: int) -> np.ndarray:
    """A uniform sample (without replacement, sorted) of min(n, n_ctx) context indices; Floyd's
    algorithm in numpy's choice keeps this O(n), not O(n_ctx)."""
    n = min(n, n_ctx)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 1]).choice(n_ctx, size=n, replace=False)).astype(np.int64)


def batch_seed(seed: int, ctx0: int) -> int:
    """The random stream of the batch that starts at context `ctx0`."""
    return int(np.random.SeedSequence([seed % 2**63, ctx0]).generate_state(1, np.uint64)[0] >> 1)


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

    def state(inp: Inputs, s: int, nonneg: bool) -> ScanState:
        st = ScanState(inp.n_units, min(fc.top_k, n_ctx), fc.per_bin, fc.n_random, device, s,
                       nonneg=nonneg, n_ctx=n_ctx, candidates=fc.negative_candidates if fc.n_random else 0)
        st.T = T
        return st

    # the negative side has its own random streams, so the positive side is what it is without it
    sides = [(state(inp, seed, inp.sae is not None), state(inp, seed ^ 0x5A5A, False) if negative else None)
             for inp in inps]
    acts = [UnitActs(inp, fc.dtype) for inp in inps]
    B = max(1, fc.batch_tokens // T)
    starts = batch_ranges(n_ctx, B, rank, world)
    t0 = time.perf_counter()
    units = sum(inp.n_units for inp in inps)
    bar = tqdm(starts, desc=f"scan ({units} units, {len(inps)} sets)", unit="batch", leave=False,
               disable=rank != 0)
    for c0 in bar:
        c1 = min(c0 + B, n_ctx)
        idx = torch.from_numpy(np.asarray(inp0.tokens[c0 * T:c1 * T], dtype=np.int64))
        got = capture_sets(inps, idx.view(c1 - c0, T).to(device), fc.dtype)
        for inp, a, (pos, neg) in zip(inps, acts, sides, strict=True):
            f = a.encode(got[inp.hook])
            pos.update(f, c0)
            if neg is not None:
                neg.update(-f, c0)
        del got
        if preempt.requested() and c1 < n_ctx:
            raise preempt.Preempted("features", f"context {c1} of {n_ctx} (scan)",
                                    "the scan keeps no resume state and nothing was written; run the same "
                                    "command again (with any number of ranks) to scan from the start")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    rate = n_ctx * T / max(time.perf_counter() - t0, 1e-9)
    if world > 1:
        # the first context of each rank's run (an empty run: where the next one starts)
        lo = [min(batch_ranges(n_ctx, B, r, world)[:1] + [c for q in range(r, world)
                                                         for c in batch_ranges(n_ctx, B, q, world)[:1]]
                  + [n_ctx]) for r in range(world)]
        sides = [(gather_merge(pos, dist, lo), gather_merge(neg, dist, lo) if neg is not None else None)
                 for pos, neg in sides]
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
