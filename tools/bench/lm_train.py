"""Tokens/s and MFU of the transformer's training step, against nanoGPT's way of computing the loss.

    python -m tools.bench.lm_train                 # n_layer 1, n_embd 128, block 1024, batch 8, 2 threads
    python -m tools.bench.lm_train --preset demo   # the demo preset's model and batch
    python -m tools.bench.lm_train --quick         # smoke run (seconds)
    python -m tools.bench.lm_train --compile       # add torch.compile'd variants (minutes to compile on CPU)

Modes (each a full step: forward, loss, backward, clipping, AdamW, exactly as transformer.train):
  reference   nanoGPT's path: full [B*T, vocab] fp32 logits, then F.cross_entropy
  fused       transformer.lm_loss: chunked unembedding + cross-entropy, fp32
  fused-bf16  the same under CPU autocast to bfloat16 (matmuls bf16, softmax and loss fp32)
Every mode starts from the same weights and sees the same batches (Shakespeare's train.bin when
prepared, else uniform random tokens), so `max_loss_diff` against `reference` checks the loss
curve is unchanged. Modes are timed interleaved, step by step, and reported as medians, so ratios
on a shared machine stay comparable even when absolute figures are noisy. MFU uses nanoGPT's
FLOPs per token (6N + 12·L·H·Q·T) over the measured fp32 (or bf16) matmul rate of this machine.
Output: one `key=value` line per mode, for scripts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # large fresh tensors: huge pages save page faults (read once by torch)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from transformer.model import GPT, GPTConfig  # noqa: E402
from transformer.trainer import flops_per_token, peak_flops  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


def batches(n: int, B: int, T: int, data: Path | None, seed: int = 0) -> list[Batch]:
    g = np.random.default_rng(seed)
    if data is not None and data.is_file():
        tokens = np.memmap(data, dtype=np.uint16, mode="r")
        out = []
        for _ in range(n):
            off = g.integers(0, len(tokens) - T - 1, B)
            rows = torch.from_numpy(np.stack([tokens[o:o + T + 1] for o in off]).astype(np.int64))
            out.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
        return out
    rows = [torch.from_numpy(g.integers(0, 50257, (B, T + 1))) for _ in range(n)]
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


class Runner:
    """One mode's model, optimizer and step function."""

    def __init__(self, mode: str, cfg: GPTConfig, compile_: bool):
        torch.manual_seed(1337)
        self.model = GPT(cfg)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95))
        self.mode = mode
        self.net = torch.compile(self.model) if compile_ else self.model
        self.bf16 = mode.endswith("bf16")
        self.losses: list[float] = []
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self.mode.startswith("reference"):
                logits, _ = self.net(x)  # nanoGPT: logits, then the loss over all of them
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1), ignore_index=-1)
            else:
                _, loss = self.net(x, y, return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))
        self.times.append(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=1)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="reference,fused,fused-bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd reference and fused")
    ap.add_argument("--preset", choices=["demo"], help="take model and batch sizes from conf/preset/<name>")
    ap.add_argument("--data", type=Path, default=Path("data/shakespeare/train.bin"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.preset:
        from tools.core.config import compose

        t = compose([f"preset={a.preset}"]).transformer
        a.n_layer, a.n_embd, a.n_head = t.n_layer, t.n_embd, t.n_head
        a.block, a.batch = t.block_size, t.batch_size
    if a.quick:
        a.block, a.batch, a.steps, a.warmup = 64, 2, 2, 1
    cfg = GPTConfig(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, block_size=a.block)
    modes = [m for m in a.modes.split(",") if m]
    if a.compile:
        modes += ["reference-compiled", "fused-compiled"]
    runners = [Runner(m, cfg, m.endswith("compiled")) for m in modes]
    data = batches(a.warmup + a.steps, a.batch, a.block, a.data)
    fpt = flops_per_token(cfg, runners[0].model.num_params())
    peaks = {dt: peak_flops("cpu", dt)[0] for dt in (torch.float32, torch.bfloat16)}
    tokens = a.batch * a.block
    print(f"# config n_layer={a.n_layer} n_embd={a.n_embd} block={a.block} batch={a.batch} "
          f"threads={a.threads} steps={a.steps} data={'train.bin' if a.data.is_file() else 'random'} "
          f"torch={torch.__version__} peak_fp32_gflops={peaks[torch.float32] / 1e9:.0f} "
          f"peak_bf16_gflops={peaks[torch.bfloat16] / 1e9:.0f}",
          flush=True)
    for x, y in data:  # interleaved: every mode takes the same step back to back
        for r in runners:
            r.step(x, y)
    ref = next((r for r in runners if r.mode == "reference"), None)
    ref_s = statistics.median(ref.times[a.warmup:]) if ref else None
    for r in runners:
        s = statistics.median(r.times[a.warmup:])
        tps = tokens / s
        peak = peaks[torch.bfloat16 if r.bf16 else torch.float32]
        diff = max(abs(p - q) for p, q in zip(r.losses, ref.losses, strict=True)) if ref else float("nan")
        speedup = ref_s / s if ref_s else float("nan")
        print(f"mode={r.mode} s_per_step={s:.3f} tokens_per_s={tps:.0f} mfu={tps * fpt / peak:.3f} "
              f"model_gflops={tps * fpt / 1e9:.1f} speedup_vs_reference={speedup:.2f} "
              f"loss_first={r.losses[0]:.4f} loss_last={r.losses[-1]:.4f} max_loss_diff={diff:.2e}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
