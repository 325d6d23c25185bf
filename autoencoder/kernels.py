"""A training forward/backward for SAEs whose codes are mostly zero (ReLU, TopK, BatchTopK).

    f = act((x − b_dec) W_enc + b_enc);   x̂ = f W_dec + b_dec

with `act` the ReLU (`l1_sae_forward`) or any activation that keeps some pre-activations as they
are and zeroes the rest (`sparse_sae_forward`: TopK, BatchTopK); ∂f/∂pre is then 1 where f > 0
and 0 elsewhere, which is all the backward below uses. A transcoder (`center=False`) encodes x
itself, not x − b_dec.

At trained sparsity (L0 ~ 32 of thousands of features) almost every entry of f is zero, yet the
plain autograd step spends 5 of its 6 GEMMs (decoder forward, both decoder gradients, the
encoder-weight gradient, the input gradient that b_dec needs) multiplying those zeros. Only the
encoder forward is inherently dense. `l1_sae_forward` keeps that one GEMM and does the rest on
the active (row, feature) pairs, the way the TopK kernels of OpenAI (`sparse_autoencoder/
kernels.py`, Gao et al. 2024) and EleutherAI's `sparsify` do, but with a data-dependent number of
active features per row:

* decoder forward: an `embedding_bag` over each row's active features, weighted by f (a CSR
  sparse-dense product);
* ∂L/∂pre only where f > 0: the decoder part `g · W_dec[c]` as a sampled dense-dense product
  (`torch.sparse.sampled_addmm`, SDDMM), plus the incoming ∂L/∂f gathered at those positions;
* ∂W_enc = x̄ᵀ·(sparse ∂pre) and ∂W_dec = fᵀ·g as `embedding_bag`s grouped by feature;
* ∂b_dec through x̄ without the input-gradient GEMM: −W_enc·(∂b_enc), since x̄ = x − b_dec
  enters every row identically.

When f is dense (a fresh SAE fires on about half its features) the same function runs dense
GEMMs instead, still skipping the input-gradient GEMM (5 GEMMs where autograd runs 6), in-place
where it can. `mode="auto"` (the default) picks per batch from the measured density; see
`sparse_benefit` for the rule and where its threshold comes from. Results equal the dense
formula up to float summation order (tests/autoencoder/test_kernels.py checks values and all gradients).

The k-sparse kinds (TopK, BatchTopK) use `ksparse_sae_forward`: it selects the active pairs
straight from the pre-activations (a per-row `topk`, or a batch top-k through a sampled threshold
and `nonzero` on the candidates only) and hands them as `SparseCodes` (row, latent, value) to the
same sparse decoder and backward, so no dense f is ever built, scanned for nonzeros or compared
with 0; what needs f (L0, fired latents, BatchTopK's threshold) reads the codes.

On CUDA the default is the plain autograd formula (cuBLAS GEMMs under autocast are fast and the
sparse ops sync the host for `nonzero`); `mode="sparse"` / `"fused"` still run there, in fp32
under autocast (not yet timed or tested on a GPU).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

MODES = ("auto", "sparse", "fused", "reference")
Activation = Callable[[torch.Tensor], torch.Tensor]

# Largest density L0 / d_sae at which `auto` takes the sparse path. `python -m tools.bench.sae_step
# --crossover` times both paths (forward + backward) over densities. On the shared, overloaded
# 2-core dev machine (fp32, d_in 512, batch 4096, 4096 features; two runs, noisy) the sparse path
# was 1.6-2.9x faster up to 8%, 1.35x at 12% and about even at 20%. Half the break-even keeps a margin
# for machines whose GEMMs are relatively faster than their gathers. Trained L1 SAEs sit far below
# (L0 32 of 4096 = 0.8%), fresh ones far above (~50%).
SPARSE_MAX_DENSITY = 0.1
# rows sampled to estimate the batch's density before choosing the path (rows are shuffled)
_DENSITY_SAMPLE_ROWS = 256
# forward calls per path taken ("sparse", "fused", "reference"): diagnostics for benches and logs
path_counts: Counter[str] = Counter()


def sparse_benefit(l0: float, d_sae: int, device: str | torch.device = "cpu") -> bool:
    """True when the sparse path is expected to beat dense GEMMs for this mean L0 (the rule `auto`
    applies per batch).

    The sparse path's cost grows with the active pairs (B·L0·d_in, at gather/scatter speed), the
    dense one with B·d_sae·d_in at GEMM speed, so the break-even is a density L0 / d_sae, not an
    L0; `SPARSE_MAX_DENSITY` says where it was measured. On CUDA: never (module docstring).
    """
    if torch.device(device).type != "cpu" or d_sae <= 0:
        return False
    return l0 / d_sae < SPARSE_MAX_DENSITY


def l1_sae_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                   b_dec: torch.Tensor, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, f) of the L1 SAE for a batch `x [B, d_in]`, differentiable w.r.t. all four parameters
    (and x). `mode`: "auto" (sparse or fused per batch on CPU, reference on CUDA), "sparse",
    "fused" (dense GEMMs, 5 instead of 6), or "reference" (plain autograd)."""
    return sparse_sae_forward(x, W_enc, b_enc, W_dec, b_dec, mode=mode)


def sparse_sae_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                       b_dec: torch.Tensor, mode: str = "auto", activation: Activation | None = None,
                       center: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, f) for f = activation(pre) (default ReLU), as `l1_sae_forward`. `activation(pre)` must
    return pre where it keeps a value (> 0) and 0 elsewhere, and be differentiable for the
    reference mode; `center=False` encodes x instead of x − b_dec (transcoders)."""
    act = activation or _relu
    if mode not in MODES:
        raise ValueError(f"l1_sae_forward mode must be one of {MODES}, not {mode!r}")
    if x.dim() != 2:
        raise ValueError(f"l1_sae_forward expects x of shape [batch, d_in], got {tuple(x.shape)}")
    if mode == "auto" and x.device.type != "cpu":
        mode = "reference"
    if mode == "reference":
        path_counts["reference"] += 1
        f = act(((x - b_dec) if center else x) @ W_enc + b_enc)
        return f @ W_dec + b_dec, f
    return _apply(x, W_enc, b_enc, W_dec, b_dec, mode, act, center)


def _relu(pre: torch.Tensor) -> torch.Tensor:
    return F.relu(pre) if torch.is_grad_enabled() else pre.relu_()


@torch.compiler.disable  # data-dependent shapes (nonzero) and a host-side choice: run eagerly
def _apply(x, W_enc, b_enc, W_dec, b_dec, mode, act=_relu, center=True):
    return _L1SAE.apply(x, W_enc, b_enc, W_dec, b_dec, mode, act, center)


def _active_pairs(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-major (row, feature) indices of f's nonzeros and the CSR row pointer [B + 1]."""
    nz = f.nonzero()
    rows, cols = nz[:, 0].contiguous(), nz[:, 1].contiguous()
    crow = torch.zeros(f.shape[0] + 1, dtype=torch.long, device=f.device)
    torch.cumsum(torch.bincount(rows, minlength=f.shape[0]), 0, out=crow[1:])
    return rows, cols, crow


class _L1SAE(torch.autograd.Function):
    # under CUDA autocast, run in fp32: the backward's hand-written ops would otherwise mix dtypes
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, mode, act=_relu, center=True):  # type: ignore[override]
        xbar = x - b_dec if center else x
        f = act(torch.addmm(b_enc, xbar, W_enc))
        if mode == "auto":
            sample = f[:_DENSITY_SAMPLE_ROWS]
            density = sample.count_nonzero().item() / max(1, sample.numel())
            mode = "sparse" if density < SPARSE_MAX_DENSITY else "fused"
        ctx.mode, ctx.center = mode, center
        path_counts[mode] += 1
        ctx.set_materialize_grads(False)  # an unused f must not cost a dense zero gradient
        if mode == "fused":
            x_hat = torch.addmm(b_dec, f, W_dec)
            ctx.save_for_backward(xbar, f, W_enc, W_dec)
            return x_hat, f
        rows, cols, crow = _active_pairs(f)
        vals = f[rows, cols]
        x_hat = F.embedding_bag(cols, W_dec, crow, mode="sum", per_sample_weights=vals,
                                include_last_offset=True)
        x_hat += b_dec
        ctx.shape = f.shape
        ctx.save_for_backward(xbar, rows, cols, crow, vals, W_enc, W_dec)
        return x_hat, f

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g, G):  # type: ignore[override]
        need_x = ctx.needs_input_grad[0]
        if ctx.mode == "fused":
            xbar, f, W_enc, W_dec = ctx.saved_tensors
            grads = _fused_backward(g, G, xbar, f, W_enc, W_dec, need_x, ctx.center)
        else:
            xbar, rows, cols, crow, vals, W_enc, W_dec = ctx.saved_tensors
            grads = _sparse_backward(g, G, xbar, rows, cols, crow, vals, W_enc, W_dec, ctx.shape, need_x,
                                     ctx.center)
        return (*grads, None, None, None)


def _fused_backward(g, G, xbar, f, W_enc, W_dec, need_x, center=True):
    B, d_sae = f.shape
    if g is None:
        g = xbar.new_zeros(B, W_dec.shape[1])
    if G is None:
        gpre = g @ W_dec.t()
    else:
        gpre = torch.addmm(G, g, W_dec.t())  # G may be a broadcast view (e.g. from a sum): fine
    gpre.masked_fill_(f == 0, 0)  # ReLU'(0) = 0, as autograd's threshold_backward
    g_W_enc = xbar.t() @ gpre
    g_b_enc = gpre.sum(0)
    g_W_dec = f.t() @ g
    # through x̄ = x − b_dec as −W_enc·(∂b_enc) (a transcoder encodes x: b_dec is the output's alone)
    g_b_dec = g.sum(0) - W_enc @ g_b_enc if center else g.sum(0)
    g_x = gpre @ W_enc.t() if need_x else None
    return g_x, g_W_enc, g_b_enc, g_W_dec, g_b_dec


def _sparse_backward(g, G, xbar, rows, cols, crow, vals, W_enc, W_dec, shape, need_x, center=True):
    B, d_sae = shape
    if g is None:
        g = xbar.new_zeros(B, W_dec.shape[1])
    # ∂L/∂pre at the active pairs: the incoming ∂L/∂f there + g[r] · W_dec[c] (an SDDMM)
    gpre = G[rows, cols] if G is not None else vals
    if vals.numel():
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the op used is tested here
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, cols, gpre, (B, d_sae), check_invariants=False)
        # without an incoming ∂L/∂f the pattern's values are ignored (beta = 0)
        gpre = torch.sparse.sampled_addmm(pattern, g, W_dec.t(), beta=1.0 if G is not None else 0.0).values()
        gpre.masked_fill_(vals <= 0, 0)  # a kept pre-activation <= 0 (k-sparse kinds): ReLU'(·) = 0
    elif G is None:
        gpre = vals.new_zeros(vals.shape)
    # group the pairs by feature for the weight gradients (∂W = Σ over that feature's rows)
    # int32 keys, sorted on one thread (`_sort_serial`)
    cols_sorted, order = _sort_serial(cols.to(torch.int32))
    fptr = torch.zeros(d_sae + 1, dtype=torch.long, device=cols.device)
    torch.cumsum(torch.bincount(cols_sorted, minlength=d_sae), 0, out=fptr[1:])
    rows_by_f, gpre_by_f = rows[order], gpre[order]
    g_W_enc = F.embedding_bag(rows_by_f, xbar, fptr, mode="sum", per_sample_weights=gpre_by_f,
                              include_last_offset=True).t()
    g_W_dec = F.embedding_bag(rows_by_f, g, fptr, mode="sum", per_sample_weights=vals[order],
                              include_last_offset=True)
    g_b_enc = torch.zeros(d_sae, dtype=gpre.dtype, device=gpre.device).index_add_(0, cols, gpre)
    # through x̄ = x − b_dec as −W_enc·(∂b_enc) (a transcoder encodes x: b_dec is the output's alone)
    g_b_dec = g.sum(0) - W_enc @ g_b_enc if center else g.sum(0)
    g_x = None
    if need_x:
        g_x = F.embedding_bag(cols, W_enc.t().contiguous(), crow, mode="sum", per_sample_weights=gpre,
                              include_last_offset=True)
    return g_x, g_W_enc, g_b_enc, g_W_dec, g_b_dec


def _sort_serial(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of 1-D keys, on one thread on the CPU: the 2-thread sort of ~10⁵ keys right after
    the step's GEMMs was measured at 150-250 ms on the shared dev machine (its second thread waits for
    a core), on one thread 3-30 ms."""
    if keys.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.sort(keys, stable=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.sort(keys, stable=True)
    finally:
        torch.set_num_threads(n)


class SparseCodes:
    """The active (row, latent, value) triples of a k-sparse code f [B, d_sae], row-major, with
    the CSR row pointer `crow` [B + 1]. Values are ReLU'd (a kept pre-activation <= 0 is stored as
    0 and counts as silent). The values carry no gradient: the losses differentiate x̂ only."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, crow: torch.Tensor,
                 shape: tuple[int, int]):
        self.rows, self.cols, self.vals, self.crow, self.shape = rows, cols, vals, crow, shape

    def dense(self) -> torch.Tensor:
        """f as a dense [B, d_sae] tensor."""
        f = self.vals.new_zeros(self.shape)
        f[self.rows, self.cols] = self.vals
        return f

    def l0(self) -> torch.Tensor:
        """Mean active latents per row (float32 scalar, no host sync)."""
        return (self.vals > 0).sum(dtype=torch.float32) / max(1, self.shape[0])

    def fired(self) -> torch.Tensor:
        """Bool [d_sae]: latents active on at least one row."""
        hits = torch.zeros(self.shape[1], dtype=self.vals.dtype, device=self.vals.device)
        return hits.index_add_(0, self.cols, (self.vals > 0).to(hits.dtype)) > 0

    def min_positive(self) -> torch.Tensor:
        """The smallest positive value (+inf when none), without a data-dependent shape."""
        return torch.where(self.vals > 0, self.vals, torch.full_like(self.vals, math.inf)).min()


def ksparse_sae_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                        b_dec: torch.Tensor, k: int, batch: bool = False,
                        center: bool = True) -> tuple[torch.Tensor, SparseCodes]:
    """(x̂, codes) of a TopK SAE (the k largest pre-activations of each row kept, ReLU'd) or, with
    `batch`, of a BatchTopK SAE (the k·B largest of the whole batch), on the sparse path: equal to
    the dense formula up to summation order (and ties at the k-th value), differentiable w.r.t. x
    and the four parameters through x̂. `center=False` encodes x instead of x − b_dec."""
    if x.dim() != 2:
        raise ValueError(f"ksparse_sae_forward expects x of shape [batch, d_in], got {tuple(x.shape)}")
    path_counts["sparse"] += 1
    x_hat, rows, cols, vals, crow = _apply_k(x, W_enc, b_enc, W_dec, b_dec, int(k), bool(batch), center)
    return x_hat, SparseCodes(rows, cols, vals, crow, (x.shape[0], W_enc.shape[1]))


@torch.compiler.disable
def _apply_k(x, W_enc, b_enc, W_dec, b_dec, k, batch, center):
    return _KSparseSAE.apply(x, W_enc, b_enc, W_dec, b_dec, k, batch, center)


def _row_topk_pairs(pre: torch.Tensor, k: int):
    B = pre.shape[0]
    vals, idx = pre.topk(min(k, pre.shape[1]), dim=1, sorted=False)
    k = idx.shape[1]
    rows = torch.arange(B, device=pre.device).repeat_interleave(k)
    crow = torch.arange(0, B * k + 1, k, device=pre.device)
    return rows, idx.reshape(-1), vals.reshape(-1), crow


# elements sampled to place the batch top-k's candidate threshold
_THRESHOLD_SAMPLE = 1 << 16


def _batch_topk_pairs(pre: torch.Tensor, k: int):
    """The k·B largest entries of pre (row-major pairs), without a top-k over all B·d_sae entries:
    a strided sample (stride coprime to d_sae, so every latent is represented) places a threshold
    a little below the expected k·B-th value; only the entries above it are gathered (one compare
    and `nonzero`), and the exact top k·B is taken among those. When too few pass, the threshold
    is lowered (down to 0: entries <= 0 contribute nothing after the ReLU)."""
    B, n_f = pre.shape
    flat = pre.reshape(-1)
    n = min(k * B, flat.numel())
    stride = max(1, flat.numel() // _THRESHOLD_SAMPLE)
    while math.gcd(stride, n_f) != 1:
        stride += 1
    sample = flat[::stride]
    m = sample.numel()
    want = n * m / flat.numel()
    for slack in (1.25, 2.0, 8.0, math.inf):
        r = min(m, int(want * slack) + 16)
        tau = 0.0
        if slack < math.inf and r < m:
            tau = max(float(sample.topk(r, sorted=False).values.min()), 0.0)
        nz = (pre > tau).nonzero() if tau > 0 else (pre > 0).nonzero()
        if nz.shape[0] >= n or tau <= 0:
            break
    rows, cols = nz[:, 0].contiguous(), nz[:, 1].contiguous()
    vals = pre[rows, cols]
    if vals.numel() > n:  # exact top n among the candidates, kept in row-major order
        sel = _sort_serial(vals.topk(n, sorted=False).indices)[0]
        rows, cols, vals = rows[sel], cols[sel], vals[sel]
    crow = torch.zeros(B + 1, dtype=torch.long, device=pre.device)
    torch.cumsum(torch.bincount(rows, minlength=B), 0, out=crow[1:])
    return rows, cols, vals, crow


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """A reused buffer for the pre-activations [B, d_sae] (dropped once the active pairs are taken):
    a fresh 64-MiB tensor every step costs its page faults again (tools/bench/sae_step.py `--thp`).
    One buffer per shape, dtype and device, on the CPU (the Function's forward runs without autograd)."""
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    key = (shape, like.dtype, like.device)
    buf = _SCRATCH.get(key)
    if buf is None:
        _SCRATCH.clear()  # keep one: a new batch size or width replaces the old buffer
        buf = _SCRATCH[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


class _KSparseSAE(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, batch, center):  # type: ignore[override]
        xbar = x - b_dec if center else x
        pre = torch.addmm(b_enc, xbar, W_enc, out=_scratch((x.shape[0], W_enc.shape[1]), xbar))
        rows, cols, vals, crow = (_batch_topk_pairs if batch else _row_topk_pairs)(pre, k)
        del pre
        vals = vals.relu_()
        x_hat = F.embedding_bag(cols, W_dec, crow, mode="sum", per_sample_weights=vals,
                                include_last_offset=True)
        x_hat += b_dec
        ctx.center, ctx.shape = center, (x.shape[0], W_enc.shape[1])
        ctx.save_for_backward(xbar, rows, cols, crow, vals, W_enc, W_dec)
        ctx.mark_non_differentiable(rows, cols, vals, crow)
        return x_hat, rows, cols, vals, crow

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g, *_):  # type: ignore[override]
        xbar, rows, cols, crow, vals, W_enc, W_dec = ctx.saved_tensors
        if g is None:
            return (None,) * 8
        grads = _sparse_backward(g, None, xbar, rows, cols, crow, vals, W_enc, W_dec, ctx.shape,
                                 ctx.needs_input_grad[0], ctx.center)
        return (*grads, None, None, None)
