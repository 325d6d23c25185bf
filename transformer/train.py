"""Train the subject GPT on `data_dir/<data.name>/train.bin` (nanoGPT's loop, made resumable).

AdamW (weight decay on 2-D weights only), linear warmup + cosine decay, gradient accumulation,
clipping, periodic val loss, autocast on CUDA, optional torch.compile, DDP under torchrun (NCCL on
GPU, gloo on CPU), W&B. Checkpoints in `run_dir/transformer/checkpoint/` (safetensors + JSON);
a run killed and restarted with the same command continues bit-for-bit: each step's batch is a
pure function of (seed, step), and model, optimizer and RNG state are restored.

    python -m transformer.train run_dir=runs/demo preset=demo
    torchrun --nproc_per_node=8 -m transformer.train preset=anthropic data=openwebtext
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tools.core import guard
from tools.core.config import UserError, output_fields, resolve_device, section, stage_main
from tools.core.distributed import Dist
from tools.core.files import config_hash, read_json, sha256_file, write_json
from tools.core.layout import RunLayout
from tools.core.stage import Stage
from tools.core.tracking import WandbConfig, init_wandb
from transformer.config import TrainConfig
from transformer.data import TokenBatches
from transformer.model import GPT, GPTConfig, save_model

CKPT_FORMAT = "monosemantic.transformer-checkpoint/1"


def model_config(c: TrainConfig) -> GPTConfig:
    return c.model_config()


def lr_at(step: int, c: TrainConfig) -> float:
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


# ---------------------------------------------------------------- distributed


def ckpt_dir(run_dir: Path) -> Path:
    return RunLayout(run_dir).transformer_checkpoint


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path: Path, step: int, model: GPT, opt: torch.optim.Optimizer, device: str,
                    info: dict[str, Any]) -> None:
    """`step_N.safetensors` (weights, Adam moments, RNG) then `state.json` pointing at it, atomically."""
    from safetensors.torch import save_file

    from tools.core.files import atomic_path

    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v.detach() if torch.is_tensor(v) else torch.tensor(v)
    tensors.update(_rng_state(device))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    name = f"step_{step:08d}.safetensors"
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / name) as tmp:
        save_file(tensors, str(tmp))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    write_json(path / "state.json", {"format": CKPT_FORMAT, "step": step, "tensors": name,
                                     "tensors_sha256": sha256_file(path / name),  # checked at resume
                                     "param_groups": groups, **info})
    for old in path.glob("step_*.safetensors"):  # only once state.json points at the new file
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path, model: GPT, opt: torch.optim.Optimizer, device: str,
                    expect: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = read_json(path / "state.json", "checkpoint state")
    if state.get("format") != CKPT_FORMAT:
        raise UserError(f"{path / 'state.json'}: format {state.get('format')!r}, expected {CKPT_FORMAT!r}")
    for key in ("model", "data", "batch"):
        if state.get(key) != expect[key]:
            diff = {k: (state.get(key, {}).get(k), v) for k, v in expect[key].items()
                    if (state.get(key) or {}).get(k) != v}
            raise UserError(
                f"checkpoint {path} was written for a different {key} config "
                f"(key: (checkpoint, now) = {diff}); use another run_dir or transformer.resume=false")
    file = path / state["tensors"]
    if not file.is_file():
        raise UserError(f"checkpoint tensors {file} named by state.json are missing")
    guard.verify_file(file, state.get("tensors_sha256"), "transformer checkpoint",
                      f"delete {path} (or set transformer.resume=false) to train from the start")
    for old in path.glob("step_*.safetensors"):  # a kill between state.json and this cleanup leaves one
        if old.name != file.name:
            old.unlink(missing_ok=True)
    tensors = load_file(str(file), device="cpu")
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(msd, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise UserError(f"checkpoint {file} does not match the model: "
                        f"missing {missing}, unexpected {unexpected}")
    osd = opt.state_dict()
    ostate: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            ostate.setdefault(int(pid), {})[name] = v
    for g, saved in zip(osd["param_groups"], state["param_groups"], strict=True):
        g.update(saved)
    osd["state"] = ostate
    opt.load_state_dict(osd)
    torch.set_rng_state(tensors["rng.cpu"])
    if device.startswith("cuda") and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return state


# ---------------------------------------------------------------- the loop


def _autocast_dtype(c: TrainConfig, device: str) -> torch.dtype:
    if c.dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, c.dtype)


def _identity(c: TrainConfig, meta: dict, dist_world: int) -> dict[str, Any]:
    """What a checkpoint / finished model must match to be reused."""
    sched = {k: getattr(c, k) for k in ("max_steps", "lr", "min_lr", "warmup_steps", "decay_steps", "beta1",
                                        "beta2", "weight_decay", "grad_clip", "dropout")}
    return {
        "model": asdict(model_config(c)),
        "data": {"source": meta.get("source"), "tokens": meta.get("tokens"),
                 "config_hash": meta.get("config_hash")},
        "batch": {"global_sequences": None, **sched},
    }


def output_hash(c: TrainConfig, meta: dict, cfg: DictConfig) -> str:
    """The trained model's hash: the output fields of `transformer`, the tokens' hash and the seed."""
    return config_hash({"train": output_fields(c), "tokens": meta.get("config_hash"), "seed": int(cfg.seed)})


class TrainStage(Stage):
    """`data_dir/<data.name>/{train,val}.bin` -> `run_dir/transformer/` (model.safetensors, config.json)."""

    name, what, key, schema = "transformer.train", "transformer", "transformer", TrainConfig
    marker = "config.json"
    sealed = ("model.safetensors",)

    def output_dir(self) -> Path:
        return RunLayout.of(self.cfg).transformer

    def data_dir(self) -> Path:
        return Path(str(self.cfg.data_dir)) / str(self.cfg.data.name)

    def output_hash(self) -> str | None:
        meta = self.data_dir() / "meta.json"
        return output_hash(self.c, read_json(meta), self.cfg) if meta.is_file() else None

    def done(self) -> bool:
        try:
            conf = read_json(self.output_dir() / "config.json")
            read_json(self.data_dir() / "meta.json")
        except UserError:
            return False
        return ((self.output_dir() / "model.safetensors").is_file()
                and conf.get("config_hash") == self.output_hash())

    def verify_inputs(self) -> None:
        guard.verify_sealed(self.data_dir(), ["train.bin", "val.bin"], "token")

    def guard(self) -> None:
        """Intact token files; a finished model of another config is replaced only with overwrite=true."""
        if (self.data_dir() / "meta.json").is_file():
            super().guard()
        else:
            self.verify_inputs()

    def finished(self, result: dict[str, Any]) -> bool:
        return bool(result.get("complete"))

    def work(self) -> dict[str, Any]:
        return _run(self.cfg, self.c)


def done(cfg: DictConfig) -> bool:
    return TrainStage(cfg).done()


def run(cfg: DictConfig) -> dict[str, Any]:
    return TrainStage(cfg).run()


def _run(cfg: DictConfig, c: TrainConfig) -> dict[str, Any]:
    wcfg = section(cfg, "wandb", WandbConfig)
    run_dir = Path(str(cfg.run_dir))
    data_dir = Path(str(cfg.data_dir)) / str(cfg.data.name)
    device = resolve_device(str(cfg.device))
    dist = Dist.start(device)
    device = dist.device(device)
    threads = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        return _train(cfg, c, wcfg, run_dir, data_dir, device, dist)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (the pipeline, tests) comes back
        dist.close()


def _train(cfg: DictConfig, c: TrainConfig, wcfg: WandbConfig, run_dir: Path, data_dir: Path, device: str,
           dist: Dist) -> dict[str, Any]:
    meta = read_json(data_dir / "meta.json", "token meta (run transformer.prepare first)")
    if meta.get("vocab_size", 0) > c.vocab_size:
        raise UserError(f"config `transformer.vocab_size`={c.vocab_size} is smaller than the tokenizer's "
                        f"{meta['vocab_size']} ({data_dir / 'meta.json'})")
    # batch geometry
    if c.tokens_per_step is not None:
        per = c.batch_size * c.block_size * dist.world
        if c.tokens_per_step % per:
            raise UserError(f"config `transformer.tokens_per_step`={c.tokens_per_step} is not a multiple of "
                            f"batch_size x block_size x processes = "
                            f"{c.batch_size} x {c.block_size} x {dist.world}")
        c.grad_accum = c.tokens_per_step // per
    accum = c.grad_accum
    global_seqs = c.batch_size * accum * dist.world
    tokens_per_step = global_seqs * c.block_size
    data = TokenBatches(data_dir, c.block_size, c.batch_size, seed=int(cfg.seed), eval_batches=c.eval_batches)

    seed = int(cfg.seed)
    torch.manual_seed(seed)  # identical init on every rank
    gcfg = model_config(c)
    model = GPT(gcfg).to(device)
    n_params = model.num_params()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    extra = {"fused": True} if device.startswith("cuda") else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.lr, betas=(c.beta1, c.beta2), **extra)
    ident = _identity(c, meta, dist.world)
    ident["batch"]["global_sequences"] = global_seqs
    step = 0
    ck = ckpt_dir(run_dir)
    if c.resume and (ck / "state.json").is_file():
        state = load_checkpoint(ck, model, opt, device, ident)
        step = int(state["step"])
        if dist.master:
            print(f"train: resuming from {ck} at step {step}", flush=True)

    raw = model
    if c.compile:
        model = torch.compile(model)
    plain = model  # no DDP wrapper: evaluation runs no collectives, so ranks may do unequal work
    if dist.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    amp_dtype = _autocast_dtype(c, device)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = (torch.autocast(dev_type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext())
    scaler = torch.amp.GradScaler(dev_type, enabled=amp_dtype == torch.float16)

    peak, peak_src = (c.peak_flops, "config") if c.peak_flops else peak_flops(device, amp_dtype)
    fpt = flops_per_token(gcfg, n_params)

    def loss_of(x: torch.Tensor, y: torch.Tensor, net: torch.nn.Module = model) -> torch.Tensor:
        with ctx:
            _, loss = net(x, y, return_logits=not c.fused_loss, loss_chunk=c.loss_chunk)
        return loss

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = 0.0
        mine = [i for i in range(c.eval_batches) if i % dist.world == dist.rank]
        for i in mine:
            x, y = data.val_batch(i, device)
            total += float(loss_of(x, y, plain))
        model.train()
        if dist.on:
            import torch.distributed as tdist

            t = torch.tensor([total], dtype=torch.float64, device=device)
            tdist.all_reduce(t)
            total = float(t.item())
        return total / c.eval_batches

    wb = None
    if dist.master:
        wb = init_wandb(wcfg, run_dir, "transformer", {
            "transformer": asdict(c), "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": seed,
            "world_size": dist.world, "tokens_per_step": tokens_per_step, "params": n_params,
            "resumed_at": step})
    from tqdm import tqdm

    last_stop = min(c.max_steps, c.halt_at_step) if c.halt_at_step else c.max_steps
    bar = tqdm(total=c.max_steps, initial=step, desc="train", unit="step", disable=not dist.master,
               dynamic_ncols=True, mininterval=1.0)
    val_loss = float("nan")
    history: list[tuple[int, float]] = []
    t_log, tok_log, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
    t_start, tok_run = time.perf_counter(), 0
    model.train()
    while step < last_stop:
        lr = lr_at(step, c)
        # RNG (dropout) seeded per (step, rank): a resumed or re-split run draws the same masks
        torch.manual_seed((seed * 1_000_003 + step) * 4099 + dist.rank)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = 0.0
        for micro in range(accum):
            x, y = data.train_batch(step, micro * dist.world + dist.rank, device)
            if dist.on:
                model.require_backward_grad_sync = micro == accum - 1
            loss = loss_of(x, y)
            scaler.scale(loss / accum).backward()
            step_loss += float(loss.detach()) / accum
        if c.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), c.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_acc += step_loss
        n_acc += 1
        tok_log += tokens_per_step
        tok_run += tokens_per_step
        bar.update(1)
        if step % c.log_interval == 0 or step == last_stop:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_log
            train_loss = dist.mean(loss_acc / n_acc, device)
            tps = tok_log / dt
            mfu = tps * fpt / (peak * dist.world)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            history.append((step, train_loss))
            if wb is not None:
                wb.log({"train/loss": train_loss, "train/lr": lr, "perf/tokens_per_s": tps, "perf/mfu": mfu,
                        "train/tokens": step * tokens_per_step}, step=step)
            t_log, tok_log, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
        if step % c.eval_interval == 0 or step == c.max_steps:
            val_loss = evaluate()
            if wb is not None:
                wb.log({"val/loss": val_loss}, step=step)
            bar.write(f"step {step}: val loss {val_loss:.4f}") if dist.master else None
            t_log = time.perf_counter()  # evaluation time is not training throughput
        if dist.master and (step % c.checkpoint_interval == 0 or step == last_stop):
            save_checkpoint(ck, step, raw, opt, device, ident)
        if dist.on and step % c.checkpoint_interval == 0:
            import torch.distributed as tdist

            tdist.barrier()
    bar.close()
    elapsed = time.perf_counter() - t_start
    tps_run = tok_run / elapsed if tok_run else float("nan")
    result = {"val_loss": val_loss,
              "unigram_entropy_nats": float(meta.get("unigram_entropy_nats", float("nan"))),
              "steps": step, "tokens_per_s": tps_run, "mfu": tps_run * fpt / (peak * dist.world),
              "train_loss": history[-1][1] if history else float("nan"), "tokens": step * tokens_per_step,
              "params": n_params, "peak_flops": peak, "peak_flops_source": peak_src,
              "complete": step >= c.max_steps}
    if step < c.max_steps:  # halted: checkpoint written, no final model
        if dist.master:
            print(f"train: halted at step {step}/{c.max_steps}; checkpoint {ck} (rerun to continue)",
                  flush=True)
        if wb is not None:
            wb.finish()
        return result
    if math.isnan(val_loss):  # resumed at the last step: every rank joins the evaluation
        val_loss = result["val_loss"] = evaluate()
    if dist.master:
        out = RunLayout(run_dir).transformer
        save_model(raw, out, extra={"tokens": meta, "val_loss": val_loss, "train": asdict(c), "seed": seed,
                                    "steps": step, "config_hash": output_hash(c, meta, cfg)})
        if wb is not None:
            wb.summary.update({"final/val_loss": val_loss, "final/unigram_entropy_nats":
                               result["unigram_entropy_nats"], "final/tokens_per_s": tps_run})
            wb.finish()
        print(f"train: {step} steps, {step * tokens_per_step:,} tokens, val loss {val_loss:.4f} nats "
              f"(unigram entropy {result['unigram_entropy_nats']:.4f}), {tps_run:,.0f} tok/s, "
              f"MFU {result['mfu']:.1%} -> {out}", flush=True)
    elif wb is not None:
        wb.finish()
    return result


main = stage_main(run)

if __name__ == "__main__":
    main()
