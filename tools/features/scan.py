"""A unit set's running statistics over every scanned token (tools/features/one_pass.py feeds it).

`ScanState` keeps, per unit, state whose size does not grow with the tokens scanned (see
tools/top_activations.py for what each part is). A signed unit's negative side is a second unit of
the same state fed the negated activations, so bottom-k by min, bins below 0 and their negatives are
the same exact machinery as the positive side, and each (token, unit) entry is read once for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tools.core.config import UserError
from tools.features.config import HIST_BINS
from tools.features.entries import entry_draws, fold_entries, peaks
from tools.features.merge import two_sum


@dataclass
class ScanState:
    """Per-unit running statistics; every tensor is O(units x (k + bins)), none grows with tokens.

    A two-sided state (`two_sided`) scans both polarities of `n_units // 2` signed units at once: units
    0 .. F-1 are the positive side (f), units F .. 2F-1 the negative side (-f), and every (token, unit)
    entry is read once for both (`halves` splits them). On the CPU the passes over the entries are
    compiled loops (tools/features/entries.py) and only the units that change are merged; `sync_free`
    (CUDA) does it all in torch ops over every unit every batch, so a batch never waits for the device
    (no `nonzero`, no `.any()`). Both ways give the same state."""

    n_units: int
    top_k: int
    per_bin: int
    n_random: int
    device: str
    seed: int
    n_ctx: int = 0  # contexts the scan will see (candidates are drawn from 0 .. n_ctx - 1)
    candidates: int = 0  # candidate negative contexts whose per-unit max is kept
    two_sided: bool = False  # units are both sides of n_units // 2 signed units (see above)
    sync_free: bool = False  # no host sync per batch (the CUDA way; same result)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        F, k, G, m, dev = self.n_units, self.top_k, HIST_BINS, self.per_bin, self.device
        inf = math.inf
        self._cand = candidate_contexts(self.n_ctx, self.candidates, self.seed)
        self.gen = torch.Generator(device=dev).manual_seed(self.seed)
        self._bad = torch.full((), -1, dtype=torch.int64, device=dev)  # first context with NaN/Inf
        if self.tensors:  # a view on another state's tensors (`halves`)
            return
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
        self.tensors["cand_ctx"][:len(self._cand)] = torch.from_numpy(self._cand).to(dev)

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    def _pick(self, changed: torch.Tensor) -> torch.Tensor:
        """The units to update: those where `changed`, or (sync_free) all of them."""
        if self.sync_free:
            return torch.arange(self.n_units, device=changed.device)
        return changed.nonzero().squeeze(1)

    @torch.no_grad()
    def update(self, f: torch.Tensor, ctx0: int) -> None:
        """Fold in one batch of activations f [B, T, width] of contexts ctx0 .. ctx0 + B - 1 (width is
        n_units, or n_units // 2 for a two-sided state)."""
        s = self.tensors
        B, T, F = f.shape
        U, dev = self.n_units, f.device
        self.T = T
        f = f.detach().float().contiguous()  # (once: both passes below read it flat)
        # each batch draws from its own streams (functions of the seed and the batch's first context),
        # so the draws do not depend on which process scans which batches: one draw per entry (a hash
        # of its index, tools/features/entries.py) and the non-firing keys from `gen`
        bseed = batch_seed(self.seed, ctx0)
        self.gen.manual_seed(bseed)
        # each context's peak per unit and where it is (the first position at the peak)
        if self.sync_free:
            cmax, argpos = f.max(1)  # [B, F]
            cmin, argmin = f.min(1) if self.two_sided else (None, None)
        else:  # the CPU: both in one compiled loop
            try:
                cmax, argpos, cmin, argmin = peaks(f, self.two_sided)
            except FloatingPointError:
                raise _non_finite(ctx0, ctx0 + B) from None
        if self.two_sided:
            cmax, argpos = torch.cat([cmax, -cmin], 1), torch.cat([argpos, argmin], 1)
        newmax = cmax.amax(0)
        bad = ~torch.isfinite(newmax).all()
        if self.sync_free:
            self._bad = torch.where(bad & (self._bad < 0), ctx0, self._bad)
        elif bad:
            raise _non_finite(ctx0, ctx0 + B)
        # running top-k of contexts by their peak; only units whose k-th best is beaten merge
        k = self.top_k
        cand = self._pick(newmax > s["top_v"][:, -1])
        if cand.numel():
            # stable: among equal values the earlier context first (the order a merge of ranks keeps)
            tv, ti = torch.cat([s["top_v"][cand], cmax.index_select(1, cand).t()], 1).sort(
                dim=1, descending=True, stable=True)
            tv, ti = tv[:, :k], ti[:, :k]
            fresh, old = ti >= k, ti.clamp(max=k - 1)
            new = (ti - k).clamp(min=0)
            s["top_c"][cand] = torch.where(fresh, ti - k + ctx0, s["top_c"][cand].gather(1, old))
            s["top_p"][cand] = torch.where(fresh, argpos.index_select(1, cand).t().gather(1, new),
                                           s["top_p"][cand].gather(1, old))
            s["top_v"][cand] = tv
        # random non-firing contexts: bottom-n random keys over the contexts where the unit is silent
        if self.n_random:
            n = self.n_random
            # [2, B, F] for two sides: the positive side's keys are the draws a one-sided state makes
            key = torch.rand((2, B, F) if self.two_sided else (1, B, F), generator=self.gen, device=dev)
            key = key.permute(1, 0, 2).reshape(B, U).masked_fill_(cmax > 0, math.inf)
            neg = self._pick(key.amin(0) < s["neg_key"][:, -1])
            if neg.numel():
                nk, ni = torch.cat([s["neg_key"][neg], key.index_select(1, neg).t()], 1).sort(
                    dim=1, stable=True)
                nk, ni = nk[:, :n], ni[:, :n]
                kept = s["neg_c"][neg].gather(1, ni.clamp(max=n - 1))
                s["neg_c"][neg] = torch.where(ni >= n, ni - n + ctx0, kept)
                s["neg_key"][neg] = nk
        # candidate negatives in this batch: keep their per-unit peak (the threshold is known at the end)
        i0, i1 = np.searchsorted(self._cand, [ctx0, ctx0 + B])
        if i1 > i0:
            s["cand_max"][i0:i1] = cmax.index_select(0, s["cand_ctx"][i0:i1] - ctx0)
        s["maxv"] = torch.maximum(s["maxv"], newmax)
        grow = (newmax >= s["scale"]) & (newmax > 0)
        if self.sync_free or grow.any():
            above = torch.exp2(torch.floor(torch.log2(newmax.clamp_min(1e-30))) + 1)  # next power of 2 > max
            self._grow(self._pick(grow), torch.where(grow, above, s["scale"]))
        self._fold_entries(f, bseed, ctx0)

    def _fold_entries(self, f: torch.Tensor, bseed: int, ctx0: int) -> None:
        """Every firing (token, unit) entry: counts, sums, histogram and per-bin samples."""
        s, G, m = self.tensors, HIST_BINS, self.per_bin
        B, T, F = f.shape
        inv = torch.where(s["scale"] > 0, G / s["scale"].clamp_min(1e-30), 0.0)  # exact: powers of two
        if not self.sync_free:  # the CPU: one compiled loop over the entries
            fold_entries(f, self.two_sided, inv, bseed, ctx0 * T, s, m)
            return
        # sync-free (CUDA): every entry, the silent ones masked, in ~20 torch ops without a host sync
        U, dev, flat = self.n_units, f.device, f.view(-1)
        col = torch.arange(F, device=dev, dtype=torch.int32)
        if self.two_sided:
            unit = ((f < 0).view(-1, F).int() * F + col).view(-1)
            act, fires = flat.abs(), flat != 0
        else:
            unit = col.expand(B * T, F).reshape(-1)
            act, fires = flat.clamp(min=0), flat > 0
        # (int32 indices halve the memory traffic of the passes over every entry)
        x = f.reshape(-1, F).double()  # per-side column sums (bincount would wait for the device)
        sides = [x.clamp(min=0).sum(0)] + ([x.clamp(max=0).sum(0).neg()] if self.two_sided else [])
        two_sum(s["total"], s["total_lo"], torch.cat(sides))
        group = unit * G + (act * inv.index_select(0, unit)).int().clamp_(0, G - 1)
        counted = torch.where(fires, group, U * G)  # silent: past the end
        ones = torch.ones((), dtype=torch.int32, device=dev).expand(counted.numel())
        batch_hist = torch.zeros(U * G + 1, dtype=torch.int32, device=dev).index_add_(0, counted, ones)
        s["hist"].view(-1).add_(batch_hist[:U * G])
        # one uniform draw gives both the slot (integer part of draw) and the key (fractional part)
        draw = entry_draws(bseed, f.numel(), dev) * m
        slot = draw.int().clamp_(max=m - 1)
        key = (draw - slot).masked_fill_(~fires, math.inf)
        self._sample(group * m + slot, key, act, ctx0 * T, F)

    def _sample(self, slot: torch.Tensor, key: torch.Tensor, act: torch.Tensor, tok0: int, F: int) -> None:
        """Each (unit, histogram bin) has m slots; every firing entry goes to one slot at random and
        a slot keeps the entry with the smallest random key sent to it (the earliest on ties). So each
        slot holds a uniform draw from its bin's tokens, the m slots hold distinct tokens, and every
        token of a bin is equally likely to be kept: a uniform sample, with scatter-min instead of a
        sort. (tools/features/entries.py does the same in one loop on the CPU.)"""
        s = self.tensors
        slot = slot.long()
        beats = key < s["res_key"].index_select(0, slot)
        s["res_key"].scatter_reduce_(0, slot, key, reduce="amin", include_self=True)
        won = beats & (key == s["res_key"].index_select(0, slot))
        # the earliest winning entry of each slot (ties of keys): scatter-min of the entry index
        entry = torch.arange(slot.numel(), device=slot.device)
        n_slots = s["res_key"].numel()
        first = torch.full((n_slots + 1,), slot.numel(), device=slot.device, dtype=torch.int64)
        dest = torch.where(won, slot, n_slots)  # the losers write to a spare last slot
        first.scatter_reduce_(0, dest, entry, reduce="amin", include_self=True)
        won &= first.index_select(0, dest) == entry
        dest = torch.where(won, slot, n_slots)
        for name, value in (("res_act", act), ("res_tok", tok0 + entry // F)):
            spare = torch.cat([s[name], s[name][:1]])
            s[name] = spare.scatter_(0, dest, value.to(spare.dtype))[:-1]

    def _grow(self, units: torch.Tensor, scale: torch.Tensor) -> None:
        """Raise R of `units` to `scale` (a power of two > the new max; [all units]), merging each unit's
        bins 2^d at a time (exact: a value's bin at R / 2^d, shifted right by d, is its bin at R); d = 0
        leaves a unit as it is."""
        s, G, m = self.tensors, HIST_BINS, self.per_bin
        old = s["scale"][units]
        target = scale[units]  # [units]: the new R of each unit (a power of two)
        fresh = old == 0
        shift = torch.where(fresh, torch.zeros_like(old), torch.log2(target / old.clamp_min(1e-30)))
        shift = shift.round().long().clamp_(min=0, max=62)
        s["scale"][units] = torch.where(fresh, target, old * torch.exp2(shift.float()))
        if not self.sync_free:  # a unit firing for the first time has nothing to merge (most, early on)
            units, shift = units[~fresh], shift[~fresh]
        n, F, dev = units.numel(), self.n_units, units.device
        bins = torch.arange(G, device=dev)
        to = bins[None, :] >> shift.clamp(max=int(math.log2(G)))[:, None]  # [n, G]: old bin -> new bin
        merged = torch.zeros(n, G, dtype=torch.int64, device=dev)
        s["hist"][units] = merged.scatter_add_(1, to, s["hist"][units])
        # slot s of a merged bin keeps the smallest key among the merged bins' slot s (the first such
        # bin on ties), so it is still a uniform draw; bins nothing merges into are emptied
        keys, acts, toks = (s[x].view(F, G, m)[units] for x in ("res_key", "res_act", "res_tok"))
        to3 = to[:, :, None].expand(n, G, m)
        kmin = torch.full_like(keys, math.inf).scatter_reduce_(1, to3, keys, "amin", include_self=True)
        src = torch.where(keys == kmin.gather(1, to3), bins[None, :, None], G)
        first = torch.full_like(to3, G).scatter_reduce_(1, to3, src, "amin", include_self=True)
        has = first < G
        first = first.clamp_(max=G - 1)
        s["res_key"].view(F, G, m)[units] = torch.where(has, kmin, math.inf)
        s["res_act"].view(F, G, m)[units] = torch.where(has, acts.gather(1, first), 0.0)
        s["res_tok"].view(F, G, m)[units] = torch.where(has, toks.gather(1, first), 0)

    def check(self) -> None:
        """Raise for NaN/Inf met in a sync_free scan (checked once, at the end)."""
        bad = int(self._bad)
        if bad >= 0:
            raise _non_finite(bad, None)

    def halves(self) -> tuple[ScanState, ScanState]:
        """A two-sided state as (positive side, negative side): views on its tensors, with the sides'
        seeds (the negative side's top-up draws use seed ^ 0x5A5A)."""
        F, G, m = self.n_units // 2, HIST_BINS, self.per_bin

        def side(i: int) -> ScanState:
            cut = {k: v[:, i * F:(i + 1) * F] if k == "cand_max" else v if k == "cand_ctx"
                   else v[i * F * G * m:(i + 1) * F * G * m] if k.startswith("res_") else v[i * F:(i + 1) * F]
                   for k, v in self.tensors.items()}
            st = ScanState(F, self.top_k, self.per_bin, self.n_random, self.device, self.seed ^ (0x5A5A * i),
                           tensors=cut)
            st.T = getattr(self, "T", 1)
            return st

        return side(0), side(1)

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


def _non_finite(c0: int, c1: int | None) -> UserError:
    where = f"contexts {c0}..{c1 - 1}" if c1 is not None else f"the batch from context {c0}"
    return UserError(f"non-finite activations in {where} (NaN/Inf in the model or SAE weights)")


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
