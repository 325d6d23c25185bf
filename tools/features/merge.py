"""Merging the scan states of several ranks into the state one process would have.

Each rank scans a contiguous run of the batches (`tools.features.one_pass.batch_ranges`) and every batch
draws from its own random stream, so the merge is exact: histograms regridded to the largest range
(a power of two: merging 2^d bins is exact) and summed; sums added as exact pairs (TwoSum); top-k by
value with ties to the earlier context, as one process keeps them; reservoir slots keep the smallest
random key (ties to the earlier rank); never-firing samples the smallest keys; each candidate
context's maxima from the rank that scanned it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def two_sum(hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor) -> None:
    """hi + lo += x in place, hi the rounded sum and lo its error (Knuth's TwoSum): the pair holds the
    exact sum of the batches' partial sums, so any grouping of the batches gives the same hi + lo."""
    t = hi + x
    bv = t - hi
    lo += (hi - (t - bv)) + (x - bv)
    hi.copy_(t)


def _all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    import torch.distributed as tdist

    out = [torch.empty_like(t) for _ in range(world)]
    tdist.all_gather(out, t.contiguous())
    return out


def gather_merge(st: Any, dist: Any, first_ctx: list[int]) -> Any:
    """Every rank's `st` (a tools.features.scan.ScanState; all_gather, in rank order) merged into
    `st` on every rank; `first_ctx[r]`: the first context rank r scanned."""
    parts = [dict(zip(st.tensors, ts, strict=True)) for ts in
             zip(*(_all_gather(t, dist.world) for t in st.tensors.values()), strict=True)]
    merge_into(st, parts, first_ctx)
    return st


@torch.no_grad()
def merge_into(st: Any, parts: list[dict[str, torch.Tensor]], first_ctx: list[int]) -> None:
    """Set `st.tensors` to the merge of `parts` (the ranks' tensors, rank order)."""
    scale = torch.stack([p["scale"] for p in parts]).amax(0)
    for p in parts:  # every rank's histogram and samples on the common grid
        need = (scale > p["scale"]).nonzero().squeeze(1)
        if need.numel():
            st.tensors = p
            st._grow(need, scale)
    out = dict(parts[0])
    out["scale"] = scale
    out["maxv"] = torch.stack([p["maxv"] for p in parts]).amax(0)
    out["hist"] = torch.stack([p["hist"] for p in parts]).sum(0)
    hi, lo = parts[0]["total"].clone(), parts[0]["total_lo"].clone()
    for p in parts[1:]:
        two_sum(hi, lo, p["total"])
        lo += p["total_lo"]
    out["total"], out["total_lo"] = hi, lo
    k = parts[0]["top_v"].shape[1]
    tv, ti = torch.cat([p["top_v"] for p in parts], 1).sort(dim=1, descending=True, stable=True)
    out["top_v"], ti = tv[:, :k], ti[:, :k]
    out["top_c"] = torch.cat([p["top_c"] for p in parts], 1).gather(1, ti)
    out["top_p"] = torch.cat([p["top_p"] for p in parts], 1).gather(1, ti)
    keys = torch.stack([p["res_key"] for p in parts])
    win = keys.argmin(0, keepdim=True)  # the first rank among equal keys
    out["res_key"] = keys.gather(0, win)[0]
    out["res_act"] = torch.stack([p["res_act"] for p in parts]).gather(0, win)[0]
    out["res_tok"] = torch.stack([p["res_tok"] for p in parts]).gather(0, win)[0]
    n = parts[0]["neg_key"].shape[1]
    if n:
        nk, ni = torch.cat([p["neg_key"] for p in parts], 1).sort(dim=1, stable=True)
        out["neg_key"] = nk[:, :n]
        out["neg_c"] = torch.cat([p["neg_c"] for p in parts], 1).gather(1, ni[:, :n])
    cand = parts[0]["cand_ctx"]
    if cand.numel():
        owner = np.searchsorted(np.asarray(first_ctx), cand.cpu().numpy(), side="right") - 1
        owner = torch.from_numpy(np.clip(owner, 0, len(parts) - 1)).to(cand.device)
        stacked = torch.stack([p["cand_max"] for p in parts])  # [ranks, candidates, units]
        out["cand_max"] = stacked[owner, torch.arange(cand.numel(), device=cand.device)]
    st.tensors = out
