"""Benchmark activation generation: `python -m tools.bench.generate [--device cuda] [--contexts N]`.

Compares the rows/s of `autoencoder.generate` (sampling, forward, scatter, shuffle, sha256, disk)
with a bare `model.mlp_acts` forward over the same batches of contexts, the ceiling it can reach
(goal: >= 0.8 of it), and reports the MB/s written. A random model of the given shape and random
tokens stand in for the real ones (timing does not depend on the weights). Prints key=value lines.
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--contexts", type=int, default=512)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--tokens-per-context", type=int, default=200)
    p.add_argument("--n-embd", type=int, default=128, help="d_in = 4 x n_embd (512 as in Anthropic 2023)")
    p.add_argument("--batch-contexts", type=int, default=64)
    p.add_argument("--rows-per-shard", type=int, default=65536)
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    args = p.parse_args(argv)

    from autoencoder import generate
    from transformer.config import compose, resolve_device
    from transformer.model import GPT, GPTConfig, save_model

    device = resolve_device(args.device)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=args.block_size, n_embd=args.n_embd, n_head=4, vocab_size=50304))
        save_model(model, root / "run" / "transformer")
        (root / "data" / "bench").mkdir(parents=True, exist_ok=True)
        tokens = np.random.default_rng(0).integers(0, 50257, 2_000_000, dtype=np.uint16)
        tokens.tofile(root / "data" / "bench" / "train.bin")
        cfg = compose([f"run_dir={root / 'run'}", f"data_dir={root / 'data'}", "data.name=bench",
                       f"device={device}", f"activations.contexts={args.contexts}",
                       f"activations.tokens_per_context={args.tokens_per_context}",
                       f"activations.batch_contexts={args.batch_contexts}",
                       f"activations.rows_per_shard={args.rows_per_shard}", "activations.resample_rows=8192"])
        rows = args.contexts * args.tokens_per_context
        d_in = 4 * args.n_embd

        # the ceiling: the same batches through mlp_acts alone, inputs already on the device
        model = model.to(device).eval()
        plan = generate.ContextPlan(int(cfg.seed), "train", len(tokens), args.block_size,
                                    args.tokens_per_context)
        batches = []
        for lo in range(0, args.contexts, args.batch_contexts):
            starts, _ = plan.get(lo, min(lo + args.batch_contexts, args.contexts))
            idx = tokens[starts[:, None] + np.arange(args.block_size)].astype(np.int64)
            batches.append(torch.from_numpy(idx).to(device))
        model.mlp_acts(batches[0])  # warm-up

        def sync() -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        sync()
        t0 = time.perf_counter()
        for idx in batches:
            model.mlp_acts(idx)
        sync()
        bare = time.perf_counter() - t0

        t0 = time.perf_counter()
        summary = generate.run(cfg)
        full = time.perf_counter() - t0
        out_dir = root / "run" / "activations" / "train"
        written = sum(f.stat().st_size for f in out_dir.glob("*.npy"))
        figures = {
            "device": device, "rows": rows, "d_in": d_in, "block_size": args.block_size,
            "bare_forward_rows_per_s": rows / bare,
            "generate_rows_per_s": rows / full,
            "generate_vs_bare": bare / full,
            "goal_generate_vs_bare": 0.8,
            "output_mb": written / 1e6,
            # pass 1 writes every row once to a bucket, pass 2 once to its shard
            "disk_write_mb_per_s": 2 * rows * d_in * 2 / 1e6 / full,
            "output_mb_per_s": written / 1e6 / full,
            "shards": summary["shards"],
            "pass1_scatter_s": summary.get("pass1_s", float("nan")),
            "pass2_shuffle_s": summary.get("pass2_s", float("nan")),
            "bare_forward_s": bare, "generate_s": full,
        }
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_figures(figures)
    return figures


if __name__ == "__main__":
    main()
