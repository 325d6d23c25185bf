"""One LM training run as an object: `Trainer(...).fit()` (nanoGPT's loop, made resumable).

The run's state (model, optimizer, data, autocast, W&B run, counters) lives on the `Trainer`;
`fit` reads top to bottom:

    while step < last_stop:  step() -> log() -> evaluate() -> checkpoint() -> stop on SIGTERM
    finish()                 final evaluation and model.safetensors

Each step's batch is a pure function of (seed, step) and dropout is seeded per (step, rank), so a
run resumed from `checkpoint/` continues bit for bit. Under `torchrun` the model is wrapped in DDP
(evaluation runs on the plain model, each rank on its share of the val batches).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tools.core import preempt
from tools.core.config import UserError
from tools.core.distributed import Dist
from tools.core.files import read_json
from tools.core.layout import RunLayout
from tools.core.tracking import WandbConfig, init_wandb
from transformer.checkpoint import ckpt_dir, load_checkpoint, save_checkpoint
from transformer.data import TokenBatches
from transformer.model import GPT, GPTConfig, save_model

MODEL_KEYS = [f.name for f in fields(GPTConfig)]
SCHEDULE_KEYS = ("max_steps", "lr", "min_lr", "warmup_steps", "decay_steps", "beta1", "beta2",
                 "weight_decay", "grad_clip", "dropout")


def model_config(c: Any) -> GPTConfig:
    """The GPTConfig named by a `transformer` section's model fields, checked."""
    return GPTConfig(**{k: getattr(c, k) for k in MODEL_KEYS}).check()


def lr_at(step: int, c: Any) -> float:
    """Linear warmup to lr, then cosine to min_lr at decay_steps (nanoGPT's schedule)."""
    decay = c.decay_steps or c.max_steps
    if step < c.warmup_steps:
        return c.lr * (step + 1) / (c.warmup_steps + 1)
    if step >= decay:
        return c.min_lr
    ratio = (step - c.warmup_steps) / max(1, decay - c.warmup_steps)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.lr - c.min_lr)


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N plus attention (PaLM appendix B, as nanoGPT's estimate_mfu)."""
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
    return 6 * n_params + 12 * L * H * Q * T


_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """Dense peak per device: a table for known GPUs (bf16 tensor cores), else a measured matmul rate."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK.items():
            if key in name:
                return value, f"{name} dense bf16 spec"
    n, k = 1024, 512
    a = torch.randn(n, k, device=device, dtype=dtype)
    b = torch.randn(k, 4096, device=device, dtype=dtype)
    a @ b
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.2:
        a @ b
        reps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    rate = 2 * n * k * 4096 * reps / (time.perf_counter() - t0)
    return rate, f"measured {str(dtype).split('.')[-1]} matmul rate on {device}"


def autocast_dtype(c: Any, device: str) -> torch.dtype:
    """`transformer.dtype` resolved: auto is bf16 (or fp16) on CUDA and fp32 on CPU."""
    if c.dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, c.dtype)


def identity(c: Any, meta: dict[str, Any], global_seqs: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: model shape, token data, batch and schedule."""
    return {
        "model": asdict(model_config(c)),
        "data": {"source": meta.get("source"), "tokens": meta.get("tokens"),
                 "config_hash": meta.get("config_hash")},
        "batch": {"global_sequences": global_seqs, **{k: getattr(c, k) for k in SCHEDULE_KEYS}},
    }


class Trainer:
    """An LM training run: `step`, `log`, `evaluate`, `checkpoint`, `finish`, and `fit` over them.

    `c` is the checked `transformer` section (`transformer.train.TrainConfig`); `final_hash` is the
    stage's output hash, written into the finished model's metadata.
    """

    def __init__(self, cfg: DictConfig, c: Any, wcfg: WandbConfig, run_dir: Path, data_dir: Path,
                 device: str, dist: Dist, final_hash: str):
        self.cfg, self.c, self.run_dir, self.device, self.dist = cfg, c, run_dir, device, dist
        self.final_hash = final_hash
        self.meta = read_json(data_dir / "meta.json", "token meta (run transformer.prepare first)")
        if self.meta.get("vocab_size", 0) > c.vocab_size:
            raise UserError(f"config `transformer.vocab_size`={c.vocab_size} is smaller than the tokenizer's "
                            f"{self.meta['vocab_size']} ({data_dir / 'meta.json'})")
        if c.tokens_per_step is not None:
            per = c.batch_size * c.block_size * dist.world
            if c.tokens_per_step % per:
                raise UserError(f"config `transformer.tokens_per_step`={c.tokens_per_step} is not a multiple "
                                f"of batch_size x block_size x processes = "
                                f"{c.batch_size} x {c.block_size} x {dist.world}")
            c.grad_accum = c.tokens_per_step // per
        global_seqs = c.batch_size * c.grad_accum * dist.world
        self.tokens_per_step = global_seqs * c.block_size
        self.seed = int(cfg.seed)
        self.data = TokenBatches(data_dir, c.block_size, c.batch_size, seed=self.seed,
                                 eval_batches=c.eval_batches)
        torch.manual_seed(self.seed)  # identical init on every rank
        self.gcfg = model_config(c)
        self.raw = GPT(self.gcfg).to(device)
        self.n_params = self.raw.num_params()
        decay = [p for p in self.raw.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.raw.parameters() if p.dim() < 2]
        extra = {"fused": True} if device.startswith("cuda") else {}
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=c.lr, betas=(c.beta1, c.beta2), **extra)
        self.ident = identity(c, self.meta, global_seqs)
        self.ckpt = ckpt_dir(run_dir)
        self.step_no = 0
        if c.resume and (self.ckpt / "state.json").is_file():
            self.step_no = int(load_checkpoint(self.ckpt, self.raw, self.opt, device, self.ident)["step"])
            if dist.master:
                print(f"train: resuming from {self.ckpt} at step {self.step_no}", flush=True)
        self.plain = torch.compile(self.raw) if c.compile else self.raw  # evaluation: no collectives
        self.model = self.plain
        if dist.on:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.plain, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
        amp = autocast_dtype(c, device)
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        self.autocast = (torch.autocast(dev_type, dtype=amp) if amp != torch.float32 else nullcontext())
        self.scaler = torch.amp.GradScaler(dev_type, enabled=amp == torch.float16)
        self.peak, self.peak_src = (c.peak_flops, "config") if c.peak_flops else peak_flops(device, amp)
        self.fpt = flops_per_token(self.gcfg, self.n_params)
        self.last_stop = min(c.max_steps, c.halt_at_step) if c.halt_at_step else c.max_steps
        self.wb = None
        if dist.master:
            self.wb = init_wandb(wcfg, run_dir, "transformer", {
                "transformer": asdict(c), "data": OmegaConf.to_container(cfg.data, resolve=True),
                "seed": self.seed, "world_size": dist.world, "tokens_per_step": self.tokens_per_step,
                "params": self.n_params, "resumed_at": self.step_no})
        self.val_loss = float("nan")
        self.history: list[tuple[int, float]] = []
        self.lr = lr_at(self.step_no, c)
        self.t_log, self.tok_log, self.loss_acc, self.n_acc = time.perf_counter(), 0, 0.0, 0
        self.t_start, self.tok_run = time.perf_counter(), 0
        self.saved_at = -1  # the step of the last checkpoint this run wrote

    # ---- the operations ------------------------------------------------------------------
    def loss_of(self, x: torch.Tensor, y: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        with self.autocast:
            _, loss = (net or self.model)(x, y, return_logits=not self.c.fused_loss,
                                          loss_chunk=self.c.loss_chunk)
        return loss

    def step(self) -> None:
        """One optimizer step over `grad_accum` micro-batches (gradients synced on the last)."""
        c, dist, step = self.c, self.dist, self.step_no
        self.lr = lr_at(step, c)
        # RNG (dropout) seeded per (step, rank): a resumed or re-split run draws the same masks
        torch.manual_seed((self.seed * 1_000_003 + step) * 4099 + dist.rank)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        step_loss = 0.0
        for micro in range(c.grad_accum):
            x, y = self.data.train_batch(step, micro * dist.world + dist.rank, self.device)
            if dist.on:
                self.model.require_backward_grad_sync = micro == c.grad_accum - 1
            loss = self.loss_of(x, y)
            self.scaler.scale(loss / c.grad_accum).backward()
            step_loss += float(loss.detach()) / c.grad_accum
        if c.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), c.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        self.loss_acc += step_loss
        self.n_acc += 1
        self.tok_log += self.tokens_per_step
        self.tok_run += self.tokens_per_step

    def log(self) -> None:
        """Mean train loss over the ranks since the last log, throughput and MFU (bar and W&B)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t_log
        train_loss = self.dist.mean(self.loss_acc / self.n_acc, self.device)
        tps = self.tok_log / dt
        mfu = tps * self.fpt / (self.peak * self.dist.world)
        self.bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{self.lr:.2e}", tok_s=f"{tps:,.0f}",
                             refresh=False)
        self.history.append((self.step_no, train_loss))
        if self.wb is not None:
            self.wb.log({"train/loss": train_loss, "train/lr": self.lr, "perf/tokens_per_s": tps,
                         "perf/mfu": mfu, "train/tokens": self.step_no * self.tokens_per_step},
                        step=self.step_no)
        self.t_log, self.tok_log, self.loss_acc, self.n_acc = time.perf_counter(), 0, 0.0, 0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val loss over the fixed val batches (each rank its share, then summed)."""
        c, dist = self.c, self.dist
        self.model.eval()
        total = 0.0
        for i in range(dist.rank, c.eval_batches, dist.world):
            x, y = self.data.val_batch(i, self.device)
            total += float(self.loss_of(x, y, self.plain))
        self.model.train()
        if dist.on:
            import torch.distributed as tdist

            t = torch.tensor([total], dtype=torch.float64, device=self.device)
            tdist.all_reduce(t)
            total = float(t.item())
        return total / c.eval_batches

    def checkpoint(self) -> None:
        """The resume state at this step (rank 0 writes it)."""
        if self.dist.master:
            save_checkpoint(self.ckpt, self.step_no, self.raw, self.opt, self.device, self.ident)
        self.saved_at = self.step_no

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to `max_steps` (or `halt_at_step`); SIGTERM/SIGINT checkpoint and raise `Preempted`."""
        from tqdm import tqdm

        c, dist = self.c, self.dist
        self.bar = tqdm(total=c.max_steps, initial=self.step_no, desc="train", unit="step",
                        disable=not dist.master, dynamic_ncols=True, mininterval=1.0)
        self.model.train()
        try:
            while self.step_no < self.last_stop:
                self.step()
                step = self.step_no
                self.bar.update(1)
                if step % c.log_interval == 0 or step == self.last_stop:
                    self.log()
                if step % c.eval_interval == 0 or step == c.max_steps:
                    self.val_loss = self.evaluate()
                    if self.wb is not None:
                        self.wb.log({"val/loss": self.val_loss}, step=step)
                    self.bar.write(f"step {step}: val loss {self.val_loss:.4f}") if dist.master else None
                    self.t_log = time.perf_counter()  # evaluation time is not training throughput
                if step % c.checkpoint_interval == 0 or step == self.last_stop:
                    self.checkpoint()
                if dist.on and step % c.checkpoint_interval == 0:
                    dist.barrier()
                if step < self.last_stop and preempt.agreed(dist, self.device):
                    self._stop()
        finally:
            self.bar.close()
        return self.finish()

    def _stop(self) -> None:
        if self.saved_at != self.step_no:
            self.checkpoint()
        dist = self.dist
        dist.barrier()  # no rank leaves while rank 0 writes
        if self.wb is not None:
            self.wb.finish()
        raise preempt.Preempted("transformer", f"step {self.step_no}", preempt.saved_hint(self.ckpt))

    def finish(self) -> dict[str, Any]:
        """The summary; at max_steps also the final val loss and `model.safetensors` (rank 0)."""
        c, dist, step, meta = self.c, self.dist, self.step_no, self.meta
        elapsed = time.perf_counter() - self.t_start
        tps_run = self.tok_run / elapsed if self.tok_run else float("nan")
        result = {"val_loss": self.val_loss,
                  "unigram_entropy_nats": float(meta.get("unigram_entropy_nats", float("nan"))),
                  "steps": step, "tokens_per_s": tps_run,
                  "mfu": tps_run * self.fpt / (self.peak * dist.world),
                  "train_loss": self.history[-1][1] if self.history else float("nan"),
                  "tokens": step * self.tokens_per_step, "params": self.n_params, "peak_flops": self.peak,
                  "peak_flops_source": self.peak_src, "complete": step >= c.max_steps}
        if step < c.max_steps:  # halted: checkpoint written, no final model
            if dist.master:
                print(f"train: halted at step {step}/{c.max_steps}; checkpoint {self.ckpt} "
                      "(rerun to continue)", flush=True)
            if self.wb is not None:
                self.wb.finish()
            return result
        if math.isnan(self.val_loss):  # resumed at the last step: every rank joins the evaluation
            self.val_loss = result["val_loss"] = self.evaluate()
        if dist.master:
            out = RunLayout(self.run_dir).transformer
            save_model(self.raw, out, extra={"tokens": meta, "val_loss": self.val_loss, "train": asdict(c),
                                             "seed": self.seed, "steps": step,
                                             "config_hash": self.final_hash})
            if self.wb is not None:
                self.wb.summary.update({"final/val_loss": self.val_loss, "final/unigram_entropy_nats":
                                        result["unigram_entropy_nats"], "final/tokens_per_s": tps_run})
            print(f"train: {step} steps, {step * self.tokens_per_step:,} tokens, "
                  f"val loss {self.val_loss:.4f} nats "
                  f"(unigram entropy {result['unigram_entropy_nats']:.4f}), {tps_run:,.0f} tok/s, "
                  f"MFU {result['mfu']:.1%} -> {out}", flush=True)
        if self.wb is not None:
            self.wb.finish()
        return result
