"""Train the subject GPT on `data_dir/<data.name>/train.bin` (nanoGPT's loop, made resumable).

AdamW (weight decay on 2-D weights only), linear warmup + cosine decay, gradient accumulation,
clipping, periodic val loss, autocast on CUDA, optional torch.compile, DDP under torchrun (NCCL on
GPU, gloo on CPU), W&B. Checkpoints in `run_dir/transformer/checkpoint/` (safetensors + JSON);
a run killed, or stopped by SIGTERM/SIGINT, and restarted with the same command continues
bit-for-bit. This module is the stage (the `transformer` section, `done`, `run`); the loop is
`transformer.trainer.Trainer`, the resume state `transformer.checkpoint`.

    python -m transformer.train run_dir=runs/demo preset=demo
    torchrun --nproc_per_node=8 -m transformer.train preset=anthropic data=openwebtext
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tools.core import guard
from tools.core.config import UserError, resolve_device, stage_main, typed
from tools.core.distributed import Dist
from tools.core.files import config_hash, read_json
from tools.core.tracking import WandbConfig
from transformer.trainer import Trainer, model_config


@dataclass
class TrainConfig:
    # model: the GPTConfig fields
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    activation: str = "gelu"
    dropout: float = 0.0
    bias: bool = False
    # batch: a step sees batch_size x grad_accum x world_size sequences of block_size tokens
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per step per process (derived when tokens_per_step is set)
    tokens_per_step: int | None = None  # global tokens per optimizer step, split over processes
    max_steps: int = 5000
    # optimizer and schedule
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 200
    decay_steps: int | None = None  # cosine reaches min_lr here; null = max_steps
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    # execution
    dtype: str = "auto"  # auto (CUDA: bf16, else fp16; CPU: fp32) | float32 | bfloat16 | float16
    compile: bool = False
    fused_loss: bool = True  # chunked unembedding + cross-entropy, no [tokens, vocab] logits kept
    loss_chunk: int = 1024  # rows per chunk of the fused loss
    threads: int | None = None  # CPU threads per process; null = torch's default
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_batches: int = 20  # fixed val batches (of batch_size sequences) per evaluation
    log_interval: int = 10
    checkpoint_interval: int = 500
    resume: bool = True  # continue from run_dir/transformer/checkpoint when it exists
    halt_at_step: int | None = None  # stop after this step as if killed (jobs under a time limit, tests)
    peak_flops: float | None = None  # per device, for MFU; null = known GPUs / measured CPU matmul rate


def check(c: TrainConfig) -> TrainConfig:
    """Range checks of the `transformer` section, each naming its key."""
    positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval",
                "checkpoint_interval", "loss_chunk")
    for k in positive:
        if getattr(c, k) < 1:
            raise UserError(f"config `transformer.{k}`={getattr(c, k)}: expected >= 1")
    for k in ("warmup_steps",):
        if getattr(c, k) < 0:
            raise UserError(f"config `transformer.{k}`={getattr(c, k)}: expected >= 0")
    if not (c.lr > 0 and 0 <= c.min_lr <= c.lr):
        raise UserError(f"config `transformer.lr`={c.lr}, `min_lr`={c.min_lr}: "
                        "expected 0 <= min_lr <= lr, lr > 0")
    if c.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"config `transformer.dtype`={c.dtype!r}: "
                        "expected auto, float32, bfloat16 or float16")
    if c.tokens_per_step is not None and c.tokens_per_step < 1:
        raise UserError(f"config `transformer.tokens_per_step`={c.tokens_per_step}: expected null or >= 1")
    if c.threads is not None and c.threads < 1:
        raise UserError(f"config `transformer.threads`={c.threads}: expected null or >= 1")
    model_config(c)  # shape checks name their key
    return c


def done(cfg: DictConfig) -> bool:
    c = check(typed(cfg.transformer, TrainConfig, "transformer"))
    out = Path(str(cfg.run_dir)) / "transformer"
    try:
        conf = read_json(out / "config.json")
        meta = read_json(Path(str(cfg.data_dir)) / str(cfg.data.name) / "meta.json")
    except UserError:
        return False
    return (out / "model.safetensors").is_file() and conf.get("config_hash") == _final_hash(c, meta, cfg)


def _final_hash(c: TrainConfig, meta: dict, cfg: DictConfig) -> str:
    keep = asdict(c)
    for k in ("compile", "threads", "eval_interval", "log_interval", "checkpoint_interval", "resume",
              "halt_at_step", "peak_flops", "fused_loss", "loss_chunk"):
        keep.pop(k)
    return config_hash({"train": keep, "tokens": meta.get("config_hash"), "seed": int(cfg.seed)})


def run(cfg: DictConfig) -> dict[str, Any]:
    with guard.output_lock(Path(str(cfg.run_dir)) / "transformer", "transformer.train"):
        _guard(cfg)
        out = _run(cfg)
        if out.get("complete") and int(os.environ.get("RANK", "0")) == 0:
            guard.seal(Path(str(cfg.run_dir)) / "transformer", ["model.safetensors"])
        return out


def _guard(cfg: DictConfig) -> None:
    """Intact token files; a finished model of another config is replaced only with overwrite=true."""
    c = check(typed(cfg.transformer, TrainConfig, "transformer"))
    data_dir = Path(str(cfg.data_dir)) / str(cfg.data.name)
    guard.verify_sealed(data_dir, ["train.bin", "val.bin"], "token")
    out = Path(str(cfg.run_dir)) / "transformer"
    if (out / "config.json").is_file() and (data_dir / "meta.json").is_file():
        old = read_json(out / "config.json").get("config_hash")
        new = _final_hash(c, read_json(data_dir / "meta.json"), cfg)
        guard.prepare_output(out, "transformer", marker="config.json", sealed=["model.safetensors"],
                             old=old, new=new, overwrite=bool(cfg.get("overwrite", False)))


def _run(cfg: DictConfig) -> dict[str, Any]:
    c = check(typed(cfg.transformer, TrainConfig, "transformer"))
    wcfg = typed(cfg.wandb, WandbConfig, "wandb")
    run_dir = Path(str(cfg.run_dir))
    data_dir = Path(str(cfg.data_dir)) / str(cfg.data.name)
    device = resolve_device(str(cfg.device))
    dist = Dist.start(device)
    device = dist.device(device)
    threads = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        meta = read_json(data_dir / "meta.json", "token meta (run transformer.prepare first)")
        return Trainer(cfg, c, wcfg, run_dir, data_dir, device, dist, _final_hash(c, meta, cfg)).fit()
    finally:
        torch.set_num_threads(threads)  # the caller's setting (the pipeline, tests) comes back
        dist.close()


main = stage_main(run)

if __name__ == "__main__":
    main()
