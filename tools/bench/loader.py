"""Benchmark the shard reader: `python -m tools.bench.loader [--rows N] [--device cuda]`.

Figures (key=value lines):
  * reader_rows_per_s: fp16 memmap shards -> `[batch, d_in]` fp32 batches on the device, the
    reader alone (prefetch thread included);
  * sae_step_rows_per_s: one Anthropic-style SAE step (d_in 512, 4096 features, ReLU encoder,
    L2 + L1 loss, fwd + bwd + Adam), written inline in plain PyTorch, on an in-memory batch;
  * reader_vs_step: goal >= 3, so training from shards runs at >= 0.95 of training from memory;
  * from_shards_vs_memory: the same steps fed by the reader vs by one in-memory tensor;
  * from_verified_shards_vs_memory: the same from a fresh reader that checks each shard's sha256
    first (in its verifier thread, as training does; goal >= 0.95); verify_mb_per_s: sha256 alone;
  * rss_mb_*: resident memory while streaming the shards twice (should stay flat however large
    the data: the reader releases each block's pages; use --rows larger than RAM/page cache).
Timings on shared CPUs are noisy; run it alone for numbers to quote.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tools.bench.report import print_figures


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size in MB, from /proc (Linux)."""
    cur = peak = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return cur, peak


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_random_shards(directory: Path, rows: int, d_in: int, rows_per_shard: int) -> None:
    """Shards written chunk by chunk, so making them does not itself need the data in RAM."""
    from autoencoder import shard_write

    rng = np.random.default_rng(0)
    entries = []
    for i, start in enumerate(range(0, rows, rows_per_shard)):
        n = min(rows_per_shard, rows - start)
        chunks = (np.abs(rng.standard_normal((min(65536, n - j), d_in), dtype=np.float32)).astype(np.float16)
                  for j in range(0, n, 65536))
        entries.append(shard_write.write_shard(directory / shard_write.shard_name(i), chunks, n, d_in))
    shard_write.write_manifest(directory, {"d_in": d_in, "dtype": "float16",
                                           "hook_name": shard_write.DEFAULT_HOOK,
                                           "model": {"path": None, "config_hash": None}, "split": "train",
                                           "contexts": None, "tokens_per_context": None, "block_size": None,
                                           "rows_per_shard": rows_per_shard, "total_rows": rows,
                                           "shards": entries, "resample_rows": 0, "seed": 0,
                                           "complete": True})


class SAEStep:
    """Anthropic 2023's SAE step, inline: x̄ = x − b_dec, f = ReLU(x̄ W_enc + b_enc), x̂ = f W_dec + b_dec."""

    def __init__(self, d_in: int, n_features: int, device: str):
        g = torch.Generator().manual_seed(0)
        self.W_enc = (torch.randn(d_in, n_features, generator=g) / d_in**0.5).to(device).requires_grad_()
        self.b_enc = torch.zeros(n_features, device=device, requires_grad=True)
        self.W_dec = (torch.randn(n_features, d_in, generator=g) / d_in**0.5).to(device).requires_grad_()
        self.b_dec = torch.zeros(d_in, device=device, requires_grad=True)
        self.opt = torch.optim.Adam([self.W_enc, self.b_enc, self.W_dec, self.b_dec], lr=1e-4)

    def __call__(self, x: torch.Tensor) -> float:
        f = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        x_hat = f @ self.W_dec + self.b_dec
        loss = (x - x_hat).pow(2).sum(-1).mean() + 1e-3 * f.abs().sum(-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        return loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--rows", type=int, default=400_000, help="rows of shards to create and stream")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--n-features", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--rows-per-shard", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=10, help="SAE steps timed")
    p.add_argument("--dir", default=None, help="existing shard folder to read, or where to write them")
    args = p.parse_args(argv)

    from autoencoder.shard_reader import ShardReader
    from tools.core.config import resolve_device

    device = resolve_device(args.device)
    temp = args.dir is None
    directory = Path(args.dir or tempfile.mkdtemp(prefix="bench-loader-"))
    figures: dict[str, float | str] = {"device": device}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    try:
        if not (directory / "manifest.json").is_file():
            write_random_shards(directory, args.rows, args.d_in, args.rows_per_shard)
        reader = ShardReader(directory, args.batch_size, seed=0, device=device)
        total = reader.total_rows
        figures.update(rows=total, d_in=reader.d_in, data_mb=total * reader.d_in * 2 / 1e6)

        # 1. the reader alone, streaming the whole data twice, RSS sampled along the way
        it = iter(reader)
        next(it)
        rss0, _ = rss_mb()
        peak_reset = reset_peak_rss()
        n_batches = max(1, 2 * total // args.batch_size)
        samples = []
        t0 = time.perf_counter()
        for i in range(n_batches):
            b = next(it)
            if i % max(1, n_batches // 8) == 0:
                samples.append(rss_mb()[0])
        sync()
        dt = time.perf_counter() - t0
        rss_end, rss_peak = rss_mb()
        figures.update(reader_rows_per_s=n_batches * args.batch_size / dt,
                       reader_mb_per_s=n_batches * args.batch_size * reader.d_in * 2 / 1e6 / dt,
                       rss_mb_start=rss0, rss_mb_end=rss_end, rss_mb_max_sampled=max(samples),
                       rss_mb_peak=rss_peak if peak_reset else float("nan"),
                       rss_mb_growth=max(samples) - rss0)
        del b

        # 2. the SAE step on an in-memory batch
        step = SAEStep(reader.d_in, args.n_features, device)
        x = next(it)
        step(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(x)
        sync()
        mem = time.perf_counter() - t0
        figures["sae_step_rows_per_s"] = args.steps * args.batch_size / mem
        figures["reader_vs_step"] = figures["reader_rows_per_s"] / figures["sae_step_rows_per_s"]
        figures["goal_reader_vs_step"] = 3.0

        # 3. the same steps fed by the reader
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(next(it))
        sync()
        fed = time.perf_counter() - t0
        figures["from_shards_vs_memory"] = mem / fed
        reader.close()

        # 4. the same from a fresh reader that still has to verify every shard's sha256
        from autoencoder import shard_check

        shard_check._VERIFIED.clear()
        t0 = time.perf_counter()
        for e in reader.entries:
            shard_check.verify_once(directory / e["file"], e["sha256"])
        figures["verify_mb_per_s"] = total * reader.d_in * 2 / 1e6 / (time.perf_counter() - t0)
        shard_check._VERIFIED.clear()
        fresh = ShardReader(directory, args.batch_size, seed=0, device=device)
        sync()
        t0 = time.perf_counter()
        it = iter(fresh)
        for _ in range(args.steps):
            step(next(it))
        sync()
        figures["from_verified_shards_vs_memory"] = mem / (time.perf_counter() - t0)
        figures["goal_from_verified_shards_vs_memory"] = 0.95
        fresh.close()
    finally:
        if temp:
            shutil.rmtree(directory, ignore_errors=True)
    print_figures(figures)
    return figures


if __name__ == "__main__":
    main()
