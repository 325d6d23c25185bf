"""Rows/s of the SAE's full training step, beside the bare-GEMM ceiling of the dense step.

    python -m tools.bench.sae_step            # d_in 512, 4096 and 16384 features, batch 4096, 2 threads
    python -m tools.bench.sae_step --quick    # smoke run (seconds)
    python -m tools.bench.sae_step --crossover  # where the sparse path starts to beat dense GEMMs
    python -m tools.bench.sae_step --arch batchtopk --features 4096 --k 32   # any architecture

The step is the trainer's own (`autoencoder.step.make_step`: forward, loss = MSE + λ L1, backward,
parallel-gradient removal, Adam, decoder renormalisation), run with `sae.kernel=dense` (the plain
autograd path, printed as `kernel=reference`) and `sae.kernel=auto` (`autoencoder.kernels`, which
picks its sparse or fused-dense path per batch; the path it took is printed as `path=`).

`--arch` picks the architecture (autoencoder/saes/: l1, topk, batchtopk, jumprelu, matryoshka).
For l1 and jumprelu, two sparsity levels: `dense` (fresh init, L0 about half the features) and
`trained` (b_enc calibrated per feature so each fires on --l0/n_features of the rows, L0 about 32,
as a trained SAE). The k-sparse kinds (topk, batchtopk, matryoshka) fire `--k` latents per row at
any point of training, so they run at that sparsity only (printed as `trained`). The ceiling is
the dense step's 6 GEMMs (12·B·d·F FLOP) timed as plain matmuls with preallocated outputs;
`ceiling_ratio` = rows/s ÷ the ceiling's rows/s. The machine may be shared:
every figure of one configuration is measured interleaved (ceiling, reference, ours, ceiling, ...)
and reported as a median, so ratios printed on one line are comparable even when absolute figures
are noisy. One line per configuration, `key=value` pairs, for scripts.

`--thp` runs with PyTorch's huge-page allocation (`THP_MEM_ALLOC_ENABLE=1`, read once at
start-up; the trainer does not set it): a fresh 64-MiB tensor then costs ~4 ms to fill instead of
~24 ms of page faults on the dev machine, and the step allocates several of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

if __name__ == "__main__" and "--thp" in sys.argv:  # PyTorch reads it once, at the first allocation
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import torch  # noqa: E402

from autoencoder import kernels  # noqa: E402

# dense peak TFLOP/s by device name fragment: (fp32, bf16 tensor core), vendor data sheets (SXM)
PEAK_TFLOPS = {"H100": (67.0, 989.0), "H200": (67.0, 989.0), "A100": (19.5, 312.0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", default="4096,16384", help="comma-separated dictionary sizes")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--l0", type=float, default=32.0, help="target L0 of the trained sparsity level")
    p.add_argument("--arch", default="l1", help="l1 | topk | batchtopk | jumprelu | matryoshka")
    p.add_argument("--k", type=int, default=32, help="k of the k-sparse architectures")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sparsity", default="dense,trained")
    p.add_argument("--no-shards", action="store_true", help="skip the shards-vs-memory line")
    p.add_argument("--thp", action="store_true",
                   help="allocate large tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1024 features, batch 1024, 3 steps")
    p.add_argument("--crossover", action="store_true",
                   help="time the kernel's sparse and fused paths over a range of densities instead")
    a = p.parse_args(argv)
    if a.quick:
        a.features, a.batch, a.steps, a.warmup = "1024", 1024, 3, 2
    a.features = [int(v) for v in a.features.split(",")]
    a.sparsity = a.sparsity.split(",")
    if any(s not in ("dense", "trained") for s in a.sparsity):
        p.error(f"--sparsity takes dense and/or trained, not {a.sparsity}")
    from autoencoder.saes import BY_NAME, arch_class

    if a.arch not in BY_NAME:
        p.error(f"--arch takes one of {sorted(BY_NAME)}, not {a.arch!r}")
    if arch_class(a.arch).k_sparse:
        a.sparsity = ["trained"]
    return a


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(**kv: object) -> str:
    out = []
    for k, v in kv.items():
        if isinstance(v, float):
            v = f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        out.append(f"{k}={v}")
    return " ".join(out)


# ---- the pieces being timed -----------------------------------------------------------------
def gemm_ceiling(B: int, d: int, n: int, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """The dense step's six GEMMs (forward 2, backward 4) with preallocated outputs."""
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype)  # noqa: E731
    xbar, W_enc, W_dec, gx = r(B, d), r(d, n), r(n, d), r(B, d)
    f, gpre = r(B, n), r(B, n)
    o_bn, o_bd, o_nd, o_dn = r(B, n), r(B, d), r(n, d), r(d, n)

    def run() -> None:
        torch.mm(xbar, W_enc, out=o_bn)  # pre-activations
        torch.mm(f, W_dec, out=o_bd)  # x_hat
        torch.mm(gx, W_dec.t(), out=o_bn)  # ∂f
        torch.mm(f.t(), gx, out=o_nd)  # ∂W_dec
        torch.mm(xbar.t(), gpre, out=o_dn)  # ∂W_enc
        torch.mm(gpre, W_enc.t(), out=o_bd)  # ∂x̄ (what b_dec's gradient needs, in autograd)
    return run


def make_trainer(n: int, args: argparse.Namespace, kernel: str, device: torch.device):
    """The trainer's own step for a fresh SAE (seeded, so every variant starts identical)."""
    from autoencoder.config import SAETrainConfig
    from autoencoder.saes import SAEModelConfig, arch_class, build_sae
    from autoencoder.step import make_optimizer, make_step

    cls = arch_class(args.arch)
    cfg = SAETrainConfig(architecture=args.arch, n_features=n, batch_size=args.batch, kernel=kernel,
                         l1_coeff=1e-3, k=args.k, compile=False)
    torch.manual_seed(0)
    sae = build_sae(SAEModelConfig(architecture=cls.registry_key(), d_in=args.d_in, d_sae=n,
                                   **cls.model_fields(cfg)), kernel=kernel)
    sae.to(device)
    opt = make_optimizer(sae, cfg)
    return sae, make_step(sae, opt, cfg)


@torch.no_grad()
def calibrate_sparsity(sae: torch.nn.Module, x: torch.Tensor, l0: float) -> None:
    """b_enc per feature so each fires on a fraction l0 / n_features of `x`'s rows."""
    pre = (x - sae.b_dec) @ sae.W_enc
    B, n = pre.shape
    k = min(B, max(1, B - round(B * l0 / n)))  # the k-th smallest becomes the threshold
    sae.b_enc.copy_(-pre.kthvalue(k, dim=0).values)


def batches_in_memory(B: int, d: int, device: torch.device, pool: int = 4) -> Iterator[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    data = [torch.randn(B, d, generator=g).to(device) for _ in range(pool)]
    i = 0
    while True:
        yield data[i % pool]
        i += 1


def interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int,
                device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, calling them in rotation."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- the benchmark --------------------------------------------------------------------------
def bench_features(n: int, args: argparse.Namespace, device: torch.device, peak: tuple[float, float] | None):
    B, d = args.batch, args.d_in
    flop = 12 * B * d * n
    # the trainer autocasts to bf16 on CUDA (sae.autocast), so that is the GEMM dtype to compare with
    ceiling = gemm_ceiling(B, d, n, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for level in args.sparsity:
        src = batches_in_memory(B, d, device)
        variants, stats = {}, {}
        for label, kernel in (("reference", "dense"), ("ours", "auto")):
            sae, step = make_trainer(n, args, kernel, device)
            if level == "trained" and not sae.k_sparse:
                calibrate_sparsity(sae, next(src), args.l0)
            stats[label] = {"l0": []}

            def run(step=step, st=stats[label], src=src):
                out = step(next(src))
                st["l0"].append(out["l0"])
            variants[label] = run
        kernels.path_counts.clear()
        t = interleaved({"ceiling": ceiling, **variants}, args.steps, args.warmup, device)
        ceil_rps = B / t["ceiling"]
        print(fmt(arch=args.arch, features=n, kind="ceiling", rows_per_s=ceil_rps, gflop_per_step=flop / 1e9,
                  tflops=flop / t["ceiling"] / 1e12, ms=t["ceiling"] * 1e3), flush=True)
        paths = "+".join(sorted(kernels.path_counts)) or "none"
        for label in ("reference", "ours"):
            rps = B / t[label]
            l0 = torch.stack(stats[label]["l0"]).mean().item()
            line = dict(arch=args.arch, features=n, l0=round(l0, 1), sparsity=level, source="memory",
                        kernel="reference" if label == "reference" else "auto")
            if label == "ours":
                line["path"] = paths
            line.update(rows_per_s=rps, ceiling_ratio=rps / ceil_rps, vs_reference=t["reference"] / t[label],
                        ms=t[label] * 1e3)
            if peak is not None:
                tf = flop / t[label] / 1e12  # dense-equivalent FLOP/s (what a dense step would need)
                line.update(tflops=tf, util_fp32=tf / peak[0], util_bf16=tf / peak[1])
            print(fmt(**line), flush=True)


def bench_shards(n: int, args: argparse.Namespace, device: torch.device) -> None:
    """The same step fed from `ShardReader` vs an in-memory tensor, interleaved."""
    try:
        from autoencoder.shard_reader import ShardReader
        from autoencoder.shard_write import write_shards
    except ImportError as e:
        print(fmt(features=n, source="shards", skipped="autoencoder.shards_unavailable"))
        print(f"# {e}", file=sys.stderr)
        return
    import numpy as np

    B, d = args.batch, args.d_in
    rows = np.random.default_rng(2).standard_normal((8 * B, d), dtype=np.float32).astype(np.float16)
    sae, step = make_trainer(n, args, "auto", device)
    mem = batches_in_memory(B, d, device)
    if not sae.k_sparse:
        calibrate_sparsity(sae, next(mem), args.l0)
    with tempfile.TemporaryDirectory(prefix="sae_step_bench_") as tmp:
        write_shards(tmp, rows, rows_per_shard=2 * B, resample_rows=0)
        reader = ShardReader(tmp, B, seed=0, device=device)
        it = iter(reader)
        try:
            t = interleaved({"memory": lambda: step(next(mem)), "shards": lambda: step(next(it))},
                            args.steps, args.warmup, device)
        finally:
            reader.close()
    for src in ("memory", "shards"):
        print(fmt(features=n, sparsity="trained", source=src, kernel="auto", rows_per_s=B / t[src],
                  shard_ratio=t["memory"] / t[src], ms=t[src] * 1e3), flush=True)


def bench_crossover(args: argparse.Namespace, device: torch.device) -> None:
    """Forward + backward of the kernel alone, sparse vs fused path, over densities."""
    B, d = args.batch, args.d_in
    for n in args.features:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(B, d, generator=g).to(device)
        W_enc = (torch.randn(d, n, generator=g) / d**0.5).to(device).requires_grad_()
        W_dec = (torch.randn(n, d, generator=g) / d**0.5).to(device).requires_grad_()
        b_dec = torch.zeros(d, device=device, requires_grad=True)
        pre = (x @ W_enc).detach()
        for density in (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.2, 0.3):
            k = min(B, max(1, B - round(B * density)))
            b_enc = (-pre.kthvalue(k, dim=0).values).requires_grad_()

            def fb(mode, params=(x, W_enc, b_enc, W_dec, b_dec)):
                def run():
                    x_hat, f = kernels.l1_sae_forward(*params, mode=mode)
                    ((x_hat - params[0]).pow(2).sum(-1).mean() + 1e-3 * f.sum(-1).mean()).backward()
                return run
            t = interleaved({"sparse": fb("sparse"), "fused": fb("fused")}, args.steps, args.warmup, device)
            print(fmt(features=n, density=density, l0=density * n, sparse_ms=t["sparse"] * 1e3,
                      fused_ms=t["fused"] * 1e3, sparse_speedup=t["fused"] / t["sparse"]), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but CUDA is not available")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if device.type == "cuda" else None
    print(fmt(bench="sae_step", arch=args.arch, device=f"'{name}'", threads=torch.get_num_threads(),
              d_in=args.d_in, batch=args.batch, steps=args.steps, dtype="float32",
              compute="bf16-autocast" if device.type == "cuda" else "float32",
              thp=os.environ.get("THP_MEM_ALLOC_ENABLE", "0"), torch=torch.__version__), flush=True)
    if args.crossover:
        bench_crossover(args, device)
        return
    for n in args.features:
        bench_features(n, args, device, peak)
    if args.no_shards:
        print(fmt(source="shards", skipped="--no-shards"))
    else:
        bench_shards(args.features[0], args, device)


if __name__ == "__main__":
    main()
