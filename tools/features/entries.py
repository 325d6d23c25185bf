"""The scan's passes over every (token, unit) entry on the CPU, as compiled loops (numba), and the
random draw each entry gets.

Per batch the scan reads every entry twice: once for each context's peak per unit (`peaks`), then,
the histogram ranges grown to the new peaks, once to add each firing entry to its unit's sum, its
histogram bin and perhaps one of its bin's reservoir slots (`fold_entries`; tools/features/scan.py
explains the state). Done with torch ops the second pass alone is ~20 passes over the entries; here
each pass is one loop, split over the cores by tiles of units (a unit's entries stay in token order,
on one thread), so the result does not depend on the thread count. The loops keep the torch way's
arithmetic (float32 bins and keys, float64 sums in token order), so they give the state the CUDA way
(`ScanState(sync_free=True)`) gives, bit for bit. Compiled on first use and cached on disk.

Each entry's random draw is a counter-based hash of (the batch's seed, the entry's index in the
batch): SplitMix64's output function (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014; constants from Vigna's splitmix64.c), top 24 bits as a float in [0, 1). It
costs no memory, every core computes its own, and `entry_draws` computes the same in torch.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from tools.features.merge import two_sum

# units per tile: the tile's histograms and slots stay in cache (L2) while its entries are read, and a
# tile's row of entries is long enough (1 KB) for the prefetcher (16 was 2-3x slower on 16k SAE latents)
TILE = 256
_GAMMA, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def entry_draws(seed: int, n: int, device: str | torch.device) -> torch.Tensor:
    """The uniform draws in [0, 1) (float32) of entries 0 .. n - 1 of a batch with seed `seed`, in
    torch (int64 arithmetic wraps as uint64's does; shifts are made logical with a mask)."""
    x = torch.arange(1, n + 1, dtype=torch.int64, device=device) * _signed(_GAMMA) + _signed(seed)
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _signed(_M1)
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _signed(_M2)
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 40) & 0xFFFFFF).float() * 2.0**-24


@numba.njit(inline="always")
def _draw(seed, e):
    x = seed + np.uint64(e + 1) * np.uint64(_GAMMA)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    x = x ^ (x >> np.uint64(31))
    return np.float32(x >> np.uint64(40)) * np.float32(2.0**-24)


@numba.njit(nogil=True, cache=True, parallel=True)
def _peaks(f, cmax, amax, cmin, amin, two_sided):  # noqa: PLR0913
    """Per (context, unit): the max over positions and the first position at it (and the min); the
    number of NaN entries (which no comparison lets in)."""
    n_ctx, n_pos, n_cols = f.shape
    nan = np.zeros((n_cols + TILE - 1) // TILE, dtype=np.int64)
    for tile in numba.prange((n_cols + TILE - 1) // TILE):
        c0 = tile * TILE
        c1 = min(c0 + TILE, n_cols)
        for b in range(n_ctx):
            for col in range(c0, c1):
                cmax[b, col] = cmin[b, col] = f[b, 0, col]
                amax[b, col] = amin[b, col] = 0
            for t in range(n_pos):
                for col in range(c0, c1):
                    v = f[b, t, col]
                    if v > cmax[b, col]:
                        cmax[b, col] = v
                        amax[b, col] = t
                    if two_sided and v < cmin[b, col]:
                        cmin[b, col] = v
                        amin[b, col] = t
                    if v != v:
                        nan[tile] += 1
    return nan.sum()


def peaks(f: torch.Tensor, two_sided: bool) -> tuple[torch.Tensor, ...]:
    """f [B, T, F] (float32, CPU): (max, its first position, min, its first position) over T, each
    [B, F] (min and its position only if `two_sided`, else None), as torch's max(1) and min(1) give
    them; raises FloatingPointError on a NaN (an infinity shows in the peaks)."""
    B, _, F = f.shape
    cmax, cmin = torch.empty(B, F), torch.empty(B, F)
    amax, amin = torch.empty(B, F, dtype=torch.int64), torch.empty(B, F, dtype=torch.int64)
    x = f.detach().contiguous().numpy()
    if _peaks(x, cmax.numpy(), amax.numpy(), cmin.numpy(), amin.numpy(), two_sided):
        raise FloatingPointError("NaN")
    return (cmax, amax, cmin, amin) if two_sided else (cmax, amax, None, None)


@numba.njit(nogil=True, cache=True, parallel=True)
def _fold(f, two_sided, inv, seed, per_bin, tok0, sums, hist, res_key, res_act, res_tok):  # noqa: PLR0913
    # no branch on an entry's sign or on whether it fires (a coin flip each for neurons, and a
    # mispredicted branch costs more than the rest of the entry): a silent entry adds 0 to a real bin.
    # Only exact zeros are skipped: rare for neurons, nearly every entry of SAE features
    n_ctx, n_pos, n_cols = f.shape
    n_bins = hist.shape[0] // inv.shape[0]
    useed = np.uint64(seed)
    m = np.float32(per_bin)
    for tile in numba.prange((n_cols + TILE - 1) // TILE):
        c0 = tile * TILE
        c1 = min(c0 + TILE, n_cols)
        for b in range(n_ctx):
            for t in range(n_pos):
                row = b * n_pos + t
                for col in range(c0, c1):
                    v = f[b, t, col]
                    if v == 0:
                        continue
                    neg = v < 0
                    fires = (v > 0) | (two_sided & neg)
                    unit = col + n_cols * np.int64(neg & two_sided)
                    act = abs(v)
                    sums[unit] += np.float64(act) if fires else 0.0
                    group = unit * n_bins + min(max(int(act * inv[unit]), 0), n_bins - 1)
                    hist[group] += np.int64(fires)
                    # one draw gives the slot (integer part of draw x m) and the key (fractional part)
                    d = _draw(useed, row * n_cols + col) * m
                    s = min(int(d), per_bin - 1)
                    key = d - np.float32(s)
                    slot = group * per_bin + s
                    if (key < res_key[slot]) & fires:  # strict: on ties the earlier entry stays
                        res_key[slot] = key
                        res_act[slot] = act
                        res_tok[slot] = tok0 + row


def fold_entries(f: torch.Tensor, two_sided: bool, inv: torch.Tensor, seed: int, tok0: int,
                 tensors: dict[str, torch.Tensor], per_bin: int) -> None:
    """Fold one batch's entries f [B, T, F] (float32, CPU) into ScanState's `tensors`, in place: an
    entry fires when > 0 (or, `two_sided`, < 0: the unit F + its column, by its magnitude). `inv`
    [units]: each unit's histogram bins per unit of activation (bins / its range); `seed`: the batch's
    draws (`entry_draws`); `tok0`: the batch's first token."""
    s = tensors
    sums = np.zeros(s["total"].shape[0], dtype=np.float64)
    _fold(f.detach().contiguous().numpy(), two_sided, inv.numpy(), seed, per_bin, tok0, sums,
          s["hist"].view(-1).numpy(), s["res_key"].numpy(), s["res_act"].numpy(), s["res_tok"].numpy())
    two_sum(s["total"], s["total_lo"], torch.from_numpy(sums))


def warm_up() -> None:
    """Compile the loops (or load them from the disk cache) and start their threads now: the first use
    in a process costs ~0.3 s (~2.5 s the first time ever), which a benchmark should not time."""
    f = torch.zeros(1, 2, 3)
    f[0, 0] = torch.tensor([1.0, -1.0, 0.0])
    peaks(f, True)
    state = {"total": torch.zeros(6, dtype=torch.float64), "total_lo": torch.zeros(6, dtype=torch.float64),
             "hist": torch.zeros(6, 2, dtype=torch.int64), "res_key": torch.full((12,), np.inf),
             "res_act": torch.zeros(12), "res_tok": torch.zeros(12, dtype=torch.int64)}
    fold_entries(f, True, torch.ones(6), 0, 0, state, 1)
