"""Benchmark activation generation: `python -m tools.bench.generate [--subject smollm2] [--device cuda]`.

Compares the rows/s of `autoencoder.generate` (sampling, forward, shuffle, sha256, disk) with a
bare forward over the same batches of contexts, the ceiling it can reach (goal: >= 0.8 of it), and
reports the MB/s written. `shuffle` says which path the stage took (in RAM for outputs that fit,
autoencoder.in_ram); `two_pass_vs_bare` times the bucket-file shuffle in the same repeats.
`--subject gpt`: a random GPT of the given shape, and the bare forward is `model.mlp_acts`.
`--subject smollm2`: the embedded SmolLM2-135M-Instruct (converted
once into `--data-dir`/models), hook points `--hook` x `--layers`, and the bare forward is the
Subject's capture of those hook points alone (the forward that stops after the last hooked layer,
inputs already on the device). Random tokens stand in for a corpus (timing does not depend on
them). The bare forward runs without autograd, as the stage's does. `generate_vs_bare` times the
stage's work on the rows (pass 1, pass 2, resample.npy and the manifest), not its one-off start
(input checks, loading the model), which `generate_end_to_end_vs_bare` includes; `_cpu`: the same
with the CPU seconds of all the process's threads (steadier on a shared machine). `--repeat N`
alternates bare forward and stage N times (a fresh output folder each) and reports the medians.
Prints key=value lines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.bench.report import print_figures
from tools.core.layout import RunLayout


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subject", choices=("gpt", "smollm2"), default="gpt")
    p.add_argument("--device", default="auto")
    p.add_argument("--contexts", type=int, default=None, help="default: 512 (gpt), 64 (smollm2)")
    p.add_argument("--block-size", type=int, default=None, help="default: 256 (gpt), 128 (smollm2)")
    p.add_argument("--tokens-per-context", type=int, default=None, help="default: 200 (gpt), 32 (smollm2)")
    p.add_argument("--n-embd", type=int, default=128, help="gpt: d_in = 4 x n_embd (512, Anthropic 2023)")
    p.add_argument("--hook", default="neurons", help="smollm2: neurons | mlp_out | resid_post")
    p.add_argument("--layers", default="0,10", help="smollm2: comma-separated layers")
    p.add_argument("--data-dir", default="data", help="smollm2: where data_dir/models holds the conversion")
    p.add_argument("--batch-contexts", type=int, default=None, help="default: 64 (gpt), 16 (smollm2)")
    p.add_argument("--rows-per-shard", type=int, default=65536)
    p.add_argument("--repeat", type=int, default=1, help="bare forward and stage alternately, N times")
    p.add_argument("--two-pass", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the two-pass shuffle (activations.in_ram_gb=0) in each repeat")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    small = args.subject == "smollm2"
    for key, gpt, hf in (("contexts", 512, 64), ("block_size", 256, 128), ("tokens_per_context", 200, 32),
                         ("batch_contexts", 64, 16)):
        if getattr(args, key) is None:
            setattr(args, key, hf if small else gpt)
    return args


def _setup(args: argparse.Namespace, root: Path, device: str) -> tuple[list[str], int, Any]:
    """Model + tokens under `root`; returns the overrides, the vocab and the bare forward `f(idx)`."""
    (root / "data" / "bench").mkdir(parents=True, exist_ok=True)
    if args.subject == "gpt":
        from transformer.model import GPT, GPTConfig, save_model

        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=args.block_size, n_embd=args.n_embd, n_head=4, vocab_size=50304))
        save_model(model, RunLayout(root / "run").transformer)
        model = model.to(device).eval()
        return [], 50257, model.mlp_acts
    from tools.core.config import compose
    from transformer.hf_load import convert_embedded
    from transformer.subject import hook_point
    from transformer.subject_load import load_subject

    convert_embedded("smollm2-135m-instruct", args.data_dir)
    os.symlink(Path(args.data_dir).resolve() / "models", root / "data" / "models")
    layers = [int(x) for x in args.layers.split(",")]
    over = ["subject=smollm2", f"activations.hook={args.hook}", f"activations.layers=[{args.layers}]"]
    subject = load_subject(compose([f"data_dir={root / 'data'}", *over]), device)
    hooks = subject.check_hooks([hook_point(args.hook, layer) for layer in layers])
    return over, subject.vocab_size, lambda idx: subject.capture(idx, hooks)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = _args(argv)
    from autoencoder import generate, scatter
    from tools.core.config import compose, resolve_device
    from transformer.data import token_dir

    device = resolve_device(args.device)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        over, vocab, bare_forward = _setup(args, root, device)
        cfg_args = [f"run_dir={root / 'run'}", f"data_dir={root / 'data'}", "data.name=bench",
                    f"device={device}", f"activations.contexts={args.contexts}",
                    f"activations.block_size={args.block_size}",
                    f"activations.tokens_per_context={args.tokens_per_context}",
                    f"activations.batch_contexts={args.batch_contexts}",
                    f"activations.rows_per_shard={args.rows_per_shard}", "activations.resample_rows=8192",
                    *over]
        cfg = compose(cfg_args)
        tokens = np.random.default_rng(0).integers(0, vocab, 2_000_000, dtype=np.uint16)
        token_dir(cfg).mkdir(parents=True, exist_ok=True)  # a Hugging Face subject's: data/bench--<model>
        tokens.tofile(token_dir(cfg) / "train.bin")
        rows = args.contexts * args.tokens_per_context

        # the ceiling: the same batches through the bare forward alone, inputs already on the device
        plan = scatter.ContextPlan(int(cfg.seed), "train", len(tokens), args.block_size,
                                    args.tokens_per_context)
        batches = []
        for lo in range(0, args.contexts, args.batch_contexts):
            starts, _ = plan.get(lo, min(lo + args.batch_contexts, args.contexts))
            idx = tokens[starts[:, None] + np.arange(args.block_size)].astype(np.int64)
            batches.append(torch.from_numpy(idx).to(device))

        def sync() -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def time_bare() -> tuple[float, float]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                for idx in batches:
                    bare_forward(idx)
                sync()
            return time.perf_counter() - t0, time.process_time() - c0

        time_bare()  # warm-up
        run_dir = RunLayout(root / "run")
        two_pass = compose([*cfg_args, "activations.in_ram_gb=0"])
        bares, fulls, rows_s, bare_cpu, rows_cpu, two_s, summary = [], [], [], [], [], [], {}
        for _ in range(max(1, args.repeat)):
            wall, cpu = time_bare()
            bares.append(wall)
            bare_cpu.append(cpu)
            shutil.rmtree(run_dir.activations_split("train"), ignore_errors=True)
            if args.two_pass:  # the bucket-file shuffle, for comparison (the same bytes)
                two_s.append(float(generate.run(two_pass)["rows_s"]))
                shutil.rmtree(run_dir.activations_split("train"), ignore_errors=True)
            t0 = time.perf_counter()
            summary = generate.run(cfg)
            fulls.append(time.perf_counter() - t0)
            rows_s.append(float(summary["rows_s"]))
            rows_cpu.append(float(summary["rows_cpu_s"]))
        bare, full, work, cpu_bare, cpu_work = (float(np.median(v))
                                                for v in (bares, fulls, rows_s, bare_cpu, rows_cpu))
        out_dir = run_dir.activations_split("train")
        written = sum(f.stat().st_size for f in out_dir.rglob("shard_*.npy"))
        writes = 1 if summary["shuffle"] == "in_ram" else 2  # two passes: each row to a bucket, then a shard
        figures = {
            "subject": args.subject, "device": device, "rows": rows, "block_size": args.block_size,
            "hook_points": len(summary.get("hooks", [None])), "repeats": len(bares),
            "bare_forward_rows_per_s": rows / bare,
            "generate_rows_per_s": rows / work,
            "generate_vs_bare": bare / work,
            "goal_generate_vs_bare": 0.8,
            "shuffle": summary["shuffle"],
            "two_pass_vs_bare": bare / float(np.median(two_s)) if two_s else float("nan"),
            "each_two_pass_vs_bare": " ".join(f"{b / w:.3f}" for b, w in zip(bares, two_s, strict=False)),
            "generate_end_to_end_vs_bare": bare / full,
            "each_generate_vs_bare": " ".join(f"{b / w:.3f}" for b, w in zip(bares, rows_s, strict=True)),
            # CPU seconds of every thread: what the stage costs, less sensitive to other jobs than wall
            "generate_vs_bare_cpu": cpu_bare / cpu_work,
            "each_generate_vs_bare_cpu": " ".join(f"{b / w:.3f}"
                                                  for b, w in zip(bare_cpu, rows_cpu, strict=True)),
            "output_mb": written / 1e6,
            "disk_write_mb_per_s": writes * written / 1e6 / work,
            "output_mb_per_s": written / 1e6 / work,
            "shards": summary["shards"],
            "pass1_scatter_s": summary.get("pass1_s", float("nan")),
            "pass2_s": summary.get("pass2_s", float("nan")),
            "bare_forward_s": bare, "generate_rows_s": work, "generate_end_to_end_s": full,
            "bare_forward_cpu_s": cpu_bare, "generate_rows_cpu_s": cpu_work,
        }
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_figures(figures)
    return figures


if __name__ == "__main__":
    main()
