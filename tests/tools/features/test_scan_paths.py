"""The scan's two ways of updating its state give the same state: the CPU way (compiled loops over the
entries, only the units that change merged) and the sync-free way CUDA uses (torch ops over every unit
and entry every batch, no host sync); and a two-sided state is the two one-sided states of f and -f."""

import math

import numba
import numpy as np
import pytest
import torch

from tools.core.config import UserError
from tools.features import entries
from tools.features import scan as fscan

KEYS = ("total", "total_lo", "maxv", "scale", "hist", "top_v", "top_c", "top_p", "res_key", "res_act",
        "res_tok", "neg_key", "neg_c", "cand_ctx", "cand_max")
DETERMINISTIC = ("total", "total_lo", "maxv", "scale", "hist", "top_v", "top_c", "top_p", "cand_ctx",
                 "cand_max")


def _scan(f: torch.Tensor, batch: int, units: int, **kw) -> fscan.ScanState:
    st = fscan.ScanState(units, 4, 3, 3, "cpu", seed=5, n_ctx=f.shape[0], candidates=6, **kw)
    for c0 in range(0, f.shape[0], batch):
        st.update(f[c0:c0 + batch], c0)
    st.check()
    return st


def _growing(seed: int, signed: bool, F: int = 5) -> torch.Tensor:
    """Activations whose range keeps doubling (so the histograms re-bin), with silent contexts."""
    g = torch.Generator().manual_seed(seed)
    n_ctx, T = 36, 12
    f = torch.randn(n_ctx, T, F, generator=g) * torch.exp2(torch.arange(n_ctx) / 5.0)[:, None, None]
    f[::7] = -f[::7].abs()  # contexts where no unit fires
    return f if signed else torch.relu(f - 0.5)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("width", [5, 2 * entries.TILE + 7])  # one tile of units; three, the last short
def test_sync_free_equals_the_cpu_way(signed, width):
    f = _growing(0, signed, width)
    F = f.shape[-1]
    units = 2 * F if signed else F
    a, b = _scan(f, 5, units, two_sided=signed), _scan(f, 5, units, sync_free=True, two_sided=signed)
    for key in KEYS:
        if key.startswith("total"):  # summed in another order (column sums on CUDA)
            continue
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert torch.allclose(a.total + a.total_lo, b.total + b.total_lo, rtol=1e-12)
    assert int(a.count.sum()) == int((f != 0).sum() if signed else (f > 0).sum())


def test_entry_draws_are_the_compiled_loops_draws():
    """The torch draws (CUDA's way) are the compiled loop's, bit for bit, and look uniform."""
    u = entries.entry_draws(2**62 + 12345, 200_000, "cpu")
    x = np.arange(200_000)
    assert torch.equal(u, torch.from_numpy(_numba_draws(np.uint64(2**62 + 12345), x)))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.bincount((u * 10).long(), minlength=10).double()  # chi-square, 9 d.o.f.
    assert float(((counts - 20_000) ** 2 / 20_000).sum()) < 30
    assert not torch.equal(u, entries.entry_draws(12346, 200_000, "cpu"))


@numba.njit
def _numba_draws(seed, x):
    out = np.empty(x.shape[0], dtype=np.float32)
    for i in range(x.shape[0]):
        out[i] = entries._draw(seed, x[i])
    return out


def test_two_sided_is_both_one_sided_states():
    """Per side, what a one-sided scan of f (resp. -f) finds: peaks, top-k, counts, sums, histograms."""
    f = _growing(1, True)
    pos, neg = _scan(f, 4, 2 * f.shape[-1], two_sided=True).halves()
    for side, g in ((pos, f), (neg, -f)):
        one = _scan(g, 4, f.shape[-1])
        for key in ("maxv", "scale", "hist", "top_v", "top_c", "top_p", "cand_max"):
            assert torch.equal(side.tensors[key], one.tensors[key]), key
        assert torch.allclose(side.total + side.total_lo, one.total + one.total_lo)
    assert pos.seed == 5 and neg.seed == 5 ^ 0x5A5A
    # the positive side's random draws are a one-sided scan's: same samples, same non-firing contexts
    one = _scan(f, 4, f.shape[-1])
    for key in ("res_key", "res_act", "res_tok", "neg_key", "neg_c"):
        assert torch.equal(pos.tensors[key], one.tensors[key]), key


@pytest.mark.parametrize("sync_free", [False, True])
def test_non_finite_activations_are_refused(sync_free):
    f = _growing(2, True)
    f[9, 3, 1] = math.nan
    with pytest.raises(UserError, match="non-finite activations"):
        _scan(f, 4, 2 * f.shape[-1], two_sided=True, sync_free=sync_free)
