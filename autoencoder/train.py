"""Train a sparse autoencoder on activation shards: `python -m autoencoder.train run_dir=...`.

Reads `run_dir/activations/train` (+ `resample.npy`), evaluates on `run_dir/activations/val` and
on held-out val token contexts (`data_dir/<data.name>/val.bin` through the model in
`run_dir/transformer`), and writes `run_dir/sae/<name>/` (`sae_weights.safetensors`, `cfg.json`,
`sparsity.safetensors`, `density_histogram.png`, `checkpoint/`).

Read top to bottom: config -> one training step (`TrainStep`, also what tools/bench calls) ->
checkpoints -> evaluation -> the loop in `run`. Runs under `torchrun` (gradients and firing masks
all-reduced; each rank reads its own rows) and resumes exactly from `checkpoint/`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from autoencoder.metrics import (
    RowStats,
    evaluate_rows,
    log10_density,
    nll_scores,
    save_density_histogram,
    val_contexts,
)
from autoencoder.resample import load_resample_set, resample_dead
from autoencoder.sae import ARCHITECTURES, SAE, SAEModelConfig, build_sae, geometric_median, save_sae
from transformer import guard
from transformer.config import UserError, resolve_device, stage_main, typed
from transformer.files import atomic_path, config_hash, read_json, sha256_file, write_json

CKPT_FORMAT = "monosemantic.sae-checkpoint/1"
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass
class SAETrainConfig:
    """The `sae` config section (conf/sae/*.yaml documents every key)."""

    architecture: str = "l1"  # l1 (Anthropic 2023) | topk (Gao et al. 2024)
    name: str | None = None  # folder under run_dir/sae; null -> derived from the config
    n_features: int = 4096
    d_in: int | None = None  # null -> from the shards' manifest; set it to assert it
    l1_coeff: float = 1e-3
    l1_warmup_steps: int = 0
    mse_reduction: str = "sum"  # sum | mean: over d_in, per row; always averaged over the batch
    k: int = 32
    aux_k: int | None = None  # null -> d_in // 2 (Gao et al.)
    aux_coeff: float = 0.03125
    dead_steps: int = 1000  # topk: a latent is dead for AuxK after this many steps without firing
    kernel: str = "auto"  # dense | sparse | auto (autoencoder.kernels when available)
    batch_size: int = 4096  # global rows per step (split across DDP ranks)
    steps: int = 125000
    lr: float = 1e-4
    lr_warmup_steps: int = 1000
    lr_schedule: str = "constant"  # constant | cosine | linear (after warmup, down to min_lr_ratio)
    min_lr_ratio: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    b_dec_init: str = "geometric_median"  # geometric_median | mean | zeros
    b_dec_init_rows: int = 16384
    resample_steps: list[int] = field(default_factory=lambda: [25000, 50000, 75000, 100000])
    resample_window: int = 12500
    resample_rows: int | None = None  # cap on rows of resample.npy used; null = all
    resample_enc_scale: float = 0.2
    resample_centered: bool = False  # new direction x − b_dec instead of the raw input x
    resample_lr_warmup_steps: int = 0
    eval_every: int = 5000
    eval_rows: int = 65536
    eval_contexts: int = 64
    eval_context_len: int | None = None  # null -> the model's block_size
    log_every: int = 100
    checkpoint_every: int = 5000
    dtype: str = "float32"
    autocast: bool = True  # CUDA only: bf16 autocast of the forward; fp32 on CPU always
    compile: bool = False
    stop_at: int | None = None  # stop with a checkpoint after this step (preemptible jobs, tests)


# keys that change neither the trained weights nor the artifacts' meaning: free to differ on resume
NON_MATH_KEYS = ("name", "kernel", "eval_every", "eval_rows", "eval_contexts", "eval_context_len",
                 "log_every", "checkpoint_every", "compile", "stop_at", "autocast")


def check_config(c: SAETrainConfig) -> SAETrainConfig:
    def bad(key: str, want: str) -> UserError:
        return UserError(f"config `sae.{key}`={getattr(c, key)!r}: expected {want}")

    if c.architecture not in ARCHITECTURES:
        raise bad("architecture", " or ".join(ARCHITECTURES))
    for key in ("n_features", "batch_size", "steps", "log_every", "eval_every", "checkpoint_every",
                "resample_window", "b_dec_init_rows", "eval_rows", "dead_steps"):
        if getattr(c, key) < 1:
            raise bad(key, "an integer >= 1")
    if c.architecture == "topk" and not 1 <= c.k <= c.n_features:
        raise UserError(f"config `sae.k`={c.k}: expected 1 <= k <= sae.n_features={c.n_features}")
    if c.mse_reduction not in ("sum", "mean"):
        raise bad("mse_reduction", "sum or mean")
    if c.kernel not in ("dense", "sparse", "auto"):
        raise bad("kernel", "dense, sparse or auto")
    if c.lr_schedule not in ("constant", "cosine", "linear"):
        raise bad("lr_schedule", "constant, cosine or linear")
    if c.b_dec_init not in ("geometric_median", "mean", "zeros"):
        raise bad("b_dec_init", "geometric_median, mean or zeros")
    if c.dtype not in ("float32", "float64"):
        raise bad("dtype", "float32 or float64 (use sae.autocast for bf16 compute on CUDA)")
    if c.lr <= 0 or c.l1_coeff < 0 or c.aux_coeff < 0:
        raise UserError("config `sae.lr` must be > 0 and `sae.l1_coeff`, `sae.aux_coeff` >= 0")
    if not 0 <= c.min_lr_ratio <= 1:
        raise bad("min_lr_ratio", "a number in [0, 1]")
    if any(s < 1 for s in c.resample_steps):
        raise bad("resample_steps", "a list of steps >= 1")
    return c


def _short(v: float) -> str:
    """1e-3 -> '1e-3', 3e-4 -> '3e-4', 0.0015 -> '1.5e-3' (names that sort and read well)."""
    if v == 0:
        return "0"
    e = math.floor(math.log10(abs(v)))
    m = round(v / 10**e, 3)
    if abs(m) >= 10:
        m, e = m / 10, e + 1
    return f"{m:g}e{e}"


def sae_name(c: SAETrainConfig, sweep_overrides: list[str] | None = None) -> str:
    """`l1-4096-l1c1e-3` / `topk-4096-k32`, plus any other `sae.` key swept in a Hydra multirun
    (e.g. `-lr3e-4`), so the runs of a sweep never share a folder."""
    if c.name:
        return c.name
    base = f"{c.architecture}-{c.n_features}-" + (f"l1c{_short(c.l1_coeff)}" if c.architecture == "l1"
                                                    else f"k{c.k}")
    implied = {"architecture", "n_features", "l1_coeff" if c.architecture == "l1" else "k", "name"}
    for ov in sweep_overrides or []:
        key, _, _ = ov.lstrip("+~").partition("=")
        if key.startswith("sae.") and key[4:] not in implied:
            val = getattr(c, key[4:], None)
            tag = _short(val) if isinstance(val, float) else str(val).replace("/", "_").replace(" ", "")
            base += f"-{key[4:].replace('_', '')}{tag}"
    return base


def _multirun_overrides() -> list[str] | None:
    """The swept `sae.` overrides of this job when inside a Hydra multirun, else None.

    Hydra keeps every override of a job in `overrides.task`, swept or fixed; the swept keys are
    the ones whose command-line value is a sweep (`a,b`, `range(...)`, `choice(...)`).
    """
    import re
    import sys

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        task = list(hc.overrides.task)
    except Exception:  # noqa: BLE001 - not under Hydra (tests, pipeline): no sweep suffix
        return None
    swept = set()
    for arg in sys.argv[1:]:
        key, eq, val = arg.partition("=")
        flat = re.sub(r"\[[^\]]*\]", "", val)  # a list value's commas do not make a sweep
        if eq and ("," in flat or re.match(r"(range|choice|interval|glob)\(", val)):
            swept.add(key.lstrip("+~"))
    return [ov for ov in task if ov.partition("=")[0].lstrip("+~") in swept]


# ---- one training step ----------------------------------------------------------------------
class TrainStep:
    """Forward, loss, backward, (DDP all-reduce), parallel-gradient removal, Adam, decoder renorm.

    `step(x, l1_coeff=None, dead_mask=None) -> dict` of detached tensors: `loss`, `mse`,
    `sparsity` (λ-free L1 or AuxK), `l0`, `fired` (bool [d_sae]: fired on this batch). No host
    sync happens inside, so a benchmark can time it back to back.
    """

    def __init__(self, sae: SAE, optimizer: torch.optim.Optimizer, cfg: SAETrainConfig,
                 world_size: int = 1):
        self.sae, self.optimizer, self.cfg, self.world_size = sae, optimizer, cfg, world_size
        self.l1_coeff = cfg.l1_coeff
        self.aux_k = cfg.aux_k or max(1, sae.cfg.d_in // 2)
        self.params = [getattr(sae, n) for n in PARAMS]
        self.loss_fn = torch.compile(sae.loss) if cfg.compile else sae.loss
        dev = sae.W_dec.device.type
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.autocast and dev == "cuda" else torch.autocast(dev, enabled=False))

    def __call__(self, x: torch.Tensor, l1_coeff: float | None = None,
                 dead_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with self.autocast:
            t = self.loss_fn(x, l1_coeff=self.l1_coeff if l1_coeff is None else l1_coeff,
                             mse_reduction=self.cfg.mse_reduction, dead_mask=dead_mask,
                             aux_k=self.aux_k, aux_coeff=self.cfg.aux_coeff)
        self.optimizer.zero_grad(set_to_none=True)
        t.overall.backward()
        if self.world_size > 1:
            self._all_reduce_grads()
        self.sae.remove_parallel_grad()
        self.optimizer.step()
        self.sae.normalize_decoder()
        fired = t.f > 0
        return {"loss": t.overall.detach(), "mse": t.mse.detach(), "sparsity": t.sparsity.detach(),
                "l0": fired.sum(-1).float().mean(), "fired": fired.any(0)}

    def _all_reduce_grads(self) -> None:
        """Average gradients over ranks in one collective (equal per-rank batches, so this is the
        gradient of the global batch mean)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        i = 0
        for p, g in zip(self.params, grads, strict=True):
            n = g.numel()
            p.grad = flat[i:i + n].view_as(p)
            i += n


def make_optimizer(sae: SAE, cfg: SAETrainConfig) -> torch.optim.Adam:
    fused = sae.W_dec.device.type == "cuda"
    return torch.optim.Adam([getattr(sae, n) for n in PARAMS], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=fused or None)


def make_step(sae: SAE, optimizer: torch.optim.Optimizer, cfg: SAETrainConfig,
              world_size: int = 1) -> TrainStep:
    """The full training step as one callable: `step = make_step(...); out = step(batch)`."""
    return TrainStep(sae, optimizer, cfg, world_size)


def lr_at(step: int, c: SAETrainConfig, last_resample: int | None) -> float:
    """LR for the update that completes step `step + 1`: linear warmup, then constant / cosine /
    linear decay, times a linear re-warmup after each resampling when configured."""
    scale = min(1.0, (step + 1) / c.lr_warmup_steps) if c.lr_warmup_steps > 0 else 1.0
    if c.lr_schedule != "constant":
        span = max(1, c.steps - c.lr_warmup_steps)
        p = min(1.0, max(0.0, (step - c.lr_warmup_steps) / span))
        shape = 0.5 * (1 + math.cos(math.pi * p)) if c.lr_schedule == "cosine" else 1 - p
        scale *= c.min_lr_ratio + (1 - c.min_lr_ratio) * shape
    if last_resample is not None and c.resample_lr_warmup_steps > 0:
        scale *= min(1.0, (step - last_resample + 1) / c.resample_lr_warmup_steps)
    return c.lr * scale


def l1_at(step: int, c: SAETrainConfig) -> float:
    """L1 coefficient warmup (linear from 0), as in Conerly et al. 2024."""
    if c.l1_warmup_steps > 0:
        return c.l1_coeff * min(1.0, (step + 1) / c.l1_warmup_steps)
    return c.l1_coeff


# ---- checkpoints ----------------------------------------------------------------------------
def math_config(c: SAETrainConfig, d_in: int, world_size: int) -> dict[str, Any]:
    d = {k: v for k, v in asdict(c).items() if k not in NON_MATH_KEYS}
    return {**d, "d_in": d_in, "world_size": world_size}


def save_checkpoint(ckpt: Path, *, sae: SAE, optimizer: torch.optim.Optimizer, step: int,
                    last_fired: torch.Tensor, state: dict[str, Any]) -> None:
    """Tensors (weights, Adam moments, firing counters, RNG) as safetensors, then the JSON that
    points at them: a checkpoint is complete only once state.json names its step."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for n in PARAMS:
        p = getattr(sae, n)
        tensors[f"sae.{n}"] = p.detach()
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"adam.{n}.{key}"] = torch.as_tensor(st[key]).detach().reshape(st[key].shape)
    tensors["last_fired"] = last_fired
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and sae.W_dec.is_cuda:
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(ckpt / "state.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step), "format": CKPT_FORMAT})
    write_json(ckpt / "state.json", {"format": CKPT_FORMAT, "step": step,  # sha256: checked at resume
                                     "tensors_sha256": sha256_file(ckpt / "state.safetensors"), **state})


def load_checkpoint(ckpt: Path, *, sae: SAE, optimizer: torch.optim.Optimizer,
                    expect: dict[str, Any]) -> tuple[int, torch.Tensor, dict[str, Any]]:
    """Restore weights, Adam, RNG; returns (step, last_fired, state). A checkpoint written under
    another config is an error naming the keys that differ."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = read_json(ckpt / "state.json", "SAE checkpoint")
    guard.verify_file(ckpt / "state.safetensors", meta.get("tensors_sha256"), "SAE checkpoint",
                      f"delete {ckpt} to train from the start")
    theirs = meta.get("config", {})
    diff = sorted(k for k in set(theirs) | set(expect) if theirs.get(k) != expect.get(k))
    if diff:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {expect.get(k)!r}" for k in diff[:6])
        raise UserError(f"checkpoint {ckpt} was written under another config ({shown}); "
                        f"use another sae.name or delete {ckpt} to start over")
    path = ckpt / "state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("step") != str(meta["step"]):
            raise UserError(f"{path} does not match {ckpt / 'state.json'} (interrupted write?)")
    t = load_file(str(path))
    dev = sae.W_dec.device
    with torch.no_grad():
        for n in PARAMS:
            getattr(sae, n).copy_(t[f"sae.{n}"])
    opt_state = optimizer.state_dict()
    for i, n in enumerate(PARAMS):
        if f"adam.{n}.exp_avg" in t:
            opt_state["state"][i] = {k: t[f"adam.{n}.{k}"].to(dev) if k != "step" else t[f"adam.{n}.{k}"]
                                     for k in ("step", "exp_avg", "exp_avg_sq")}
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(t["rng.cpu"])
    if "rng.cuda" in t and dev.type == "cuda":
        torch.cuda.set_rng_state(t["rng.cuda"])
    return int(meta["step"]), t["last_fired"].to(dev), meta


# ---- evaluation -----------------------------------------------------------------------------
class Evaluator:
    """Held-out figures: reconstruction and density on val rows, NLL scores on val contexts."""

    def __init__(self, cfg: DictConfig, c: SAETrainConfig, run_dir: Path, d_in: int, hook_name: str,
                 device: str, log):
        from autoencoder import shards

        self.c, self.device, self.log = c, device, log
        self.layer = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else 0
        self.model, self.contexts = None, None
        model_dir = run_dir / "transformer"
        val_bin = Path(cfg.data_dir) / str(cfg.data.name) / "val.bin"
        if (model_dir / "config.json").is_file() and val_bin.is_file():
            from transformer.model import load_model

            self.model = load_model(model_dir, device)
            if self.model.config.d_mlp != d_in:
                raise UserError(f"{model_dir}: model d_mlp={self.model.config.d_mlp} but the shards "
                                f"have d_in={d_in}")
            ctx_len = min(c.eval_context_len or self.model.config.block_size, self.model.config.block_size)
            self.contexts = val_contexts(val_bin, c.eval_contexts, ctx_len)
        else:
            log(f"note: no model at {model_dir} or no {val_bin}: loss recovered is not computed")
        val_dir = run_dir / "activations" / "val"
        self.rows: torch.Tensor | None = None
        if (val_dir / "manifest.json").is_file():
            shards.read_manifest(val_dir, d_in=d_in)
            total = min(c.eval_rows, int(shards.read_manifest(val_dir)["total_rows"]))
            reader = shards.ShardReader(val_dir, min(total, 8192), seed=0, device="cpu")
            try:
                got, parts = 0, []
                for b in reader:
                    parts.append(b[: total - got])
                    got += parts[-1].shape[0]
                    if got >= total:
                        break
            finally:
                reader.close()
            self.rows = torch.cat(parts)
            self.source = str(val_dir)
        elif self.model is not None:  # activations of the val contexts themselves
            acts = []
            for i in range(0, self.contexts.shape[0], 16):
                h = self.model.mlp_acts(self.contexts[i:i + 16, :-1].to(device), self.layer)
                acts.append(h.reshape(-1, h.shape[-1]).float().cpu())
            self.rows = torch.cat(acts)[: c.eval_rows]
            self.source = f"{val_bin} contexts"
        else:
            log(f"note: no val shards at {val_dir} and no model: held-out row metrics are skipped")
            self.source = None
        if self.rows is not None and not torch.isfinite(self.rows).all():
            raise UserError(f"validation activations from {self.source} contain NaN/Inf")

    @torch.no_grad()
    def __call__(self, sae: SAE) -> tuple[dict[str, float], torch.Tensor | None]:
        out: dict[str, float] = {}
        density = None
        was_training = sae.training
        sae.eval()
        if self.rows is not None:
            bs = 8192
            stats: RowStats = evaluate_rows(
                sae, (self.rows[i:i + bs].to(self.device) for i in range(0, self.rows.shape[0], bs)),
                self.c.mse_reduction)
            out.update(stats.summary())
            density = stats.density()
        if self.model is not None:
            out.update(nll_scores(self.model, sae, self.contexts, self.layer))
        sae.train(was_training)
        return out, density


# ---- the stage ------------------------------------------------------------------------------
def _dist_setup(device: str) -> tuple[int, int, bool]:
    """(rank, world_size, we_initialised) under torchrun; (0, 1, False) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return dist.get_rank(), dist.get_world_size(), False


def _paths(cfg: DictConfig, name: str) -> tuple[Path, Path, Path]:
    run_dir = Path(str(cfg.run_dir))
    return run_dir, run_dir / "activations" / "train", run_dir / "sae" / name


def _stage_hash(c: SAETrainConfig, manifest: dict[str, Any], world_size: int) -> str:
    shard_ids = [s.get("sha256") for s in manifest.get("shards", [])]
    return config_hash({"sae": math_config(c, int(manifest["d_in"]), world_size),
                        "shards": shard_ids, "model": manifest.get("model")})


def done(cfg: DictConfig) -> bool:
    """True when `run_dir/sae/<name>/` holds a finished SAE trained under this config and shards."""
    c = check_config(typed(cfg.sae, SAETrainConfig, "sae"))
    _, train_dir, sae_dir = _paths(cfg, sae_name(c, _multirun_overrides()))
    try:
        meta = read_json(sae_dir / "cfg.json", "SAE config")
        manifest = read_json(train_dir / "manifest.json", "shard manifest")
    except UserError:
        return False
    world = int(meta.get("training", {}).get("world_size", 1))
    return ((sae_dir / "sae_weights.safetensors").is_file()
            and meta.get("training", {}).get("config_hash") == _stage_hash(c, manifest, world))


def run(cfg: DictConfig) -> dict[str, Any]:
    c = check_config(typed(cfg.sae, SAETrainConfig, "sae"))
    _, train_dir, sae_dir = _paths(cfg, sae_name(c, _multirun_overrides()))
    with guard.output_lock(sae_dir, "autoencoder.train"):
        _guard(cfg, c, train_dir, sae_dir)
        out = _run(cfg)
        if "stopped_at" not in out and int(os.environ.get("RANK", "0")) == 0:
            guard.seal(sae_dir, ["sae_weights.safetensors", "sparsity.safetensors"])
        return out


def _guard(cfg: DictConfig, c: SAETrainConfig, train_dir: Path, sae_dir: Path) -> None:
    """Refuse shards made from a model that changed since, and replacing a finished SAE unasked."""
    from autoencoder import shards

    manifest = shards.read_manifest(train_dir)
    model = manifest.get("model") or {}
    weights = Path(str(model.get("path"))) / "model.safetensors"
    if model.get("weights_sha256") and weights.is_file():
        made_from = {"model": {"path": str(weights), "sha256": model["weights_sha256"]}}
        guard.check_provenance(train_dir, made_from, "rerun autoencoder.generate with overwrite=true")
    old = (read_json(sae_dir / "cfg.json", "SAE config").get("training") or {}).get("config_hash") \
        if (sae_dir / "cfg.json").is_file() else None
    ckpt = sae_dir / "checkpoint" / "state.json"
    new = _stage_hash(c, manifest, int(os.environ.get("WORLD_SIZE", "1")))
    resuming = ckpt.is_file() and read_json(ckpt, "SAE checkpoint").get("config_hash") == new
    guard.prepare_output(sae_dir, "SAE", marker="cfg.json", sealed=["sae_weights.safetensors"], old=old,
                         new=new, overwrite=bool(cfg.get("overwrite", False)) or resuming,
                         rename_key="sae.name")


def _run(cfg: DictConfig) -> dict[str, Any]:
    from autoencoder import shards

    c = check_config(typed(cfg.sae, SAETrainConfig, "sae"))
    from transformer.tracking import WandbConfig, init_wandb

    wcfg = typed(cfg.wandb, WandbConfig, "wandb")
    device = resolve_device(str(cfg.device))
    name = sae_name(c, _multirun_overrides())
    run_dir, train_dir, sae_dir = _paths(cfg, name)
    ckpt_dir = sae_dir / "checkpoint"

    manifest = shards.read_manifest(train_dir)
    d_in = int(manifest["d_in"])
    if c.d_in is not None and c.d_in != d_in:
        raise UserError(f"config `sae.d_in`={c.d_in} but the shards in {train_dir} have d_in={d_in}")
    hook_name = str(manifest.get("hook_name", "blocks.0.mlp.hook_post"))
    if c.architecture == "topk" and c.k > c.n_features:
        raise UserError(f"config `sae.k`={c.k} exceeds `sae.n_features`={c.n_features}")

    rank, world, own_pg = _dist_setup(device)
    try:
        return _train(cfg, c, wcfg, init_wandb, device, name, run_dir, train_dir, sae_dir, ckpt_dir,
                      manifest, d_in, hook_name, rank, world)
    finally:
        if own_pg and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, c, wcfg, init_wandb, device, name, run_dir, train_dir, sae_dir, ckpt_dir, manifest,
           d_in, hook_name, rank, world) -> dict[str, Any]:
    from tqdm import tqdm

    from autoencoder import shards

    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    stage_hash = _stage_hash(c, manifest, world)

    # finished already under this config: report what is there
    if done(cfg) and not (ckpt_dir / "state.json").is_file():
        meta = read_json(sae_dir / "cfg.json", "SAE config")
        log(f"sae {name}: already trained under this config -> {sae_dir}")
        return _summary(name, meta.get("metrics", {}), sae_dir, meta.get("training", {}))

    if c.batch_size % world:
        raise UserError(f"config `sae.batch_size`={c.batch_size} must be divisible by the "
                        f"{world} DDP ranks")
    if device.startswith("cuda") and world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = f"cuda:{torch.cuda.current_device()}"
    torch.manual_seed(int(cfg.seed))
    gen = torch.Generator().manual_seed(int(cfg.seed))

    mcfg = SAEModelConfig(architecture=ARCHITECTURES[c.architecture], d_in=d_in, d_sae=c.n_features,
                          k=c.k if c.architecture == "topk" else None, hook_name=hook_name, dtype=c.dtype)
    sae = build_sae(mcfg, kernel=c.kernel)
    sae.reset_parameters(generator=gen)
    sae = sae.to(device=device, dtype=getattr(torch, c.dtype))
    optimizer = make_optimizer(sae, c)
    step_fn = make_step(sae, optimizer, c, world)

    scheduled = sorted(s for s in set(c.resample_steps) if s < c.steps)
    resample_x = None
    if scheduled:
        resample_x = load_resample_set(train_dir / "resample.npy", d_in)
        if c.resample_rows:
            resample_x = resample_x[: c.resample_rows]
        resample_x = resample_x.to(device=device, dtype=sae.W_dec.dtype)

    reader = shards.ShardReader(train_dir, c.batch_size // world, seed=int(cfg.seed), rank=rank,
                                world_size=world, dtype=getattr(torch, c.dtype), device=device)
    expect = {**math_config(c, d_in, world),
              "shards": config_hash([e.get("sha256") for e in manifest.get("shards", [])])}
    start, last_fired = 0, torch.zeros(c.n_features, dtype=torch.long, device=device)
    history: dict[str, Any] = {"resampled": [], "wandb_id": None}
    if (ckpt_dir / "state.json").is_file():
        start, last_fired, meta = load_checkpoint(ckpt_dir, sae=sae, optimizer=optimizer, expect=expect)
        reader.load_state_dict(meta["readers"][rank])
        history = {"resampled": meta.get("resampled", []), "wandb_id": meta.get("wandb_id")}
        log(f"sae {name}: resuming from {ckpt_dir} at step {start}")
    else:
        _init_b_dec(sae, c, train_dir, d_in, device, log)
        if world > 1:  # every rank starts from rank 0's initialisation
            for n in PARAMS:
                dist.broadcast(getattr(sae, n).data, 0)

    wb = None
    if is_main:
        wb = _wandb(init_wandb, wcfg, run_dir, name, c, history)
        history["wandb_id"] = getattr(wb, "id", None)
    evaluator = Evaluator(cfg, c, run_dir, d_in, hook_name, device, log) if is_main else None

    def checkpoint(step: int) -> None:
        readers = [reader.state_dict()]
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, readers[0])
            readers = gathered
        if is_main:
            for n in PARAMS:
                if not torch.isfinite(getattr(sae, n)).all():
                    raise UserError(f"non-finite {n} at step {step}: not checkpointing")
            save_checkpoint(ckpt_dir, sae=sae, optimizer=optimizer, step=step, last_fired=last_fired,
                            state={"config": expect, "config_hash": stage_hash, "name": name,
                                   "readers": readers, "resampled": history["resampled"],
                                   "wandb_id": history["wandb_id"], "time": time.time()})
        if world > 1:
            dist.barrier()

    def last_good() -> str:
        p = ckpt_dir / "state.json"
        return f"{p} (step {read_json(p)['step']})" if p.is_file() else "none (no checkpoint yet)"

    sparsity_key = "losses/l1_loss" if c.architecture == "l1" else "losses/auxiliary_reconstruction_loss"
    it = iter(reader)
    acc: dict[str, torch.Tensor] = {}
    n_acc = 0
    t0, rows0 = time.time(), 0
    bar = tqdm(total=c.steps, initial=start, desc=f"sae {name}", disable=not is_main, unit="step",
               dynamic_ncols=True)
    step = start
    try:
        while step < c.steps:
            last_rs = max((r["step"] for r in history["resampled"]), default=None)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, c, last_rs)
            x = next(it)
            if x.shape[1] != d_in:
                raise UserError(f"shard rows in {train_dir} have width {x.shape[1]}, manifest says {d_in}")
            dead_mask = None
            if c.architecture == "topk":
                dead_mask = (step - last_fired) >= c.dead_steps
            out = step_fn(x, l1_coeff=l1_at(step, c), dead_mask=dead_mask)
            loss = out["loss"].reshape(1)
            fired = out["fired"].float()
            if world > 1:  # one collective: the loss (for the NaN check) and the firing mask
                buf = torch.cat([loss, fired])
                dist.all_reduce(buf, op=dist.ReduceOp.MAX)
                loss, fired = buf[:1], buf[1:]
            if not math.isfinite(float(loss)):
                what = "the input batch" if not torch.isfinite(x).all() else "the loss"
                raise UserError(f"non-finite values in {what} at step {step + 1} of sae {name} "
                                f"(shards {train_dir}); last good checkpoint: {last_good()}")
            step += 1
            last_fired[fired > 0] = step
            for key in ("loss", "mse", "sparsity", "l0"):
                acc[key] = acc.get(key, 0) + out[key].float()
            n_acc += 1
            rows0 += c.batch_size

            if step in scheduled:
                n = _resample(sae, optimizer, c, step, last_fired, resample_x, int(cfg.seed), world)
                last_fired[(step - last_fired) >= c.resample_window] = step  # fresh window
                history["resampled"].append({"step": step, "count": n})
                log(f"\nstep {step}: resampled {n} dead features")
                if wb is not None:
                    wb.log({"sparsity/resampled": n}, step=step)

            if step % c.log_every == 0 or step == c.steps:
                m = {k: float(v) / n_acc for k, v in acc.items()}
                ev = _batch_ev(sae, x)
                rec = {"losses/overall_loss": m["loss"], "losses/mse_loss": m["mse"],
                       sparsity_key: m["sparsity"], "metrics/l0": m["l0"], "metrics/explained_variance": ev,
                       "details/current_learning_rate": optimizer.param_groups[0]["lr"],
                       "details/l1_coefficient": l1_at(step - 1, c),
                       "sparsity/dead_in_window": int(((step - last_fired) >= c.resample_window).sum()),
                       "details/rows_per_s": rows0 / max(time.time() - t0, 1e-9)}
                if wb is not None:
                    wb.log(rec, step=step)
                bar.set_postfix(mse=f"{m['mse']:.4g}", l0=f"{m['l0']:.1f}", ev=f"{ev:.3f}")
                acc, n_acc = {}, 0
            bar.update(1)

            if evaluator is not None and step % c.eval_every == 0 and step < c.steps:
                em, dens = evaluator(sae)
                _log_eval(wb, em, dens, step)
            if step % c.checkpoint_every == 0 and step < c.steps:
                checkpoint(step)
            if c.stop_at is not None and step >= c.stop_at and step < c.steps:
                checkpoint(step)
                bar.close()
                log(f"sae {name}: stopped at step {step} (sae.stop_at); resume by running again")
                return {"name": name, "stopped_at": step, "path": str(sae_dir)}
    finally:
        bar.close()
        reader.close()

    # ---- final evaluation and artifacts (rank 0) ----
    summary: dict[str, Any] = {}
    if is_main:
        metrics, dens = evaluator(sae)
        if dens is None:
            dens = torch.zeros(c.n_features)
            log("note: no held-out rows: density and sparsity figures are not available")
        _log_eval(wb, metrics, dens if evaluator.rows is not None else None, step)
        training = {"config": asdict(c), "config_hash": stage_hash, "world_size": world, "steps": step,
                    "rows": step * c.batch_size, "resampled": history["resampled"],
                    "shards": str(train_dir), "eval_source": evaluator.source, "seed": int(cfg.seed)}
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        logd = log10_density(dens)
        save_sae(sae, sae_dir, {"training": training, "metrics": metrics}, sparsity_log10=logd)
        if evaluator.rows is not None:
            save_density_histogram(logd, sae_dir / "density_histogram.png",
                                   f"{name}: log10 feature density on {evaluator.rows.shape[0]} val rows")
        summary = _summary(name, metrics, sae_dir, training)
        if wb is not None:
            wb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            wb.finish()
        _remove_checkpoint(ckpt_dir)
        print(_summary_line(summary), flush=True)
    if world > 1:
        box = [summary]
        dist.broadcast_object_list(box, 0)
        summary = box[0]
    return summary


def _init_b_dec(sae: SAE, c: SAETrainConfig, train_dir: Path, d_in: int, device: str, log) -> None:
    """b_dec at the geometric median (or mean) of a sample of training rows."""
    if c.b_dec_init == "zeros":
        return
    from autoencoder import shards

    want = min(c.b_dec_init_rows, int(shards.read_manifest(train_dir)["total_rows"]))
    reader = shards.ShardReader(train_dir, min(want, 8192), seed=12345, device="cpu")
    try:
        parts, got = [], 0
        for b in reader:
            parts.append(b)
            got += b.shape[0]
            if got >= want:
                break
    finally:
        reader.close()
    sample = torch.cat(parts)[: c.b_dec_init_rows].double()
    if not torch.isfinite(sample).all():
        raise UserError(f"non-finite values in the activations of {train_dir} (b_dec init sample)")
    center = geometric_median(sample) if c.b_dec_init == "geometric_median" else sample.mean(0)
    with torch.no_grad():
        sae.b_dec.copy_(center.to(device=device, dtype=sae.b_dec.dtype))
    log(f"b_dec initialised at the {c.b_dec_init.replace('_', ' ')} of {sample.shape[0]} rows "
        f"(norm {float(center.norm()):.3g})")


def _resample(sae, optimizer, c, step, last_fired, resample_x, seed, world) -> int:
    dead = (step - last_fired) >= c.resample_window
    # same seed on every rank and an all-reduced firing history: identical choices everywhere
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return resample_dead(sae, optimizer, dead, resample_x, generator=gen, mse_reduction=c.mse_reduction,
                         enc_scale=c.resample_enc_scale, centered=c.resample_centered)


@torch.no_grad()
def _batch_ev(sae: SAE, x: torch.Tensor) -> float:
    from autoencoder.metrics import explained_variance

    return explained_variance(x, sae(x))


def _log_eval(wb, metrics: dict[str, float], density: torch.Tensor | None, step: int) -> None:
    """Held-out figures: reconstruction under `eval/`, sparsity under SAELens' own names (they are
    only ever computed on held-out rows), and the log10 density histogram."""
    if wb is None:
        return
    import numpy as np
    import wandb

    rec: dict[str, Any] = {}
    for k, v in metrics.items():
        own = k.startswith("sparsity/") or k == "metrics/mean_log10_feature_sparsity"
        rec[k if own else f"eval/{k}"] = v
    if density is not None:
        counts, edges = np.histogram(log10_density(density).numpy(), bins=50, range=(-10.0, 0.0))
        rec["plots/log10_feature_density"] = wandb.Histogram(np_histogram=(counts, edges))
    wb.log(rec, step=step)


def _wandb(init_wandb, wcfg, run_dir: Path, name: str, c: SAETrainConfig, history: dict[str, Any]):
    """W&B run named after the SAE; a resumed run continues the same W&B run id."""
    saved = {k: os.environ.get(k) for k in ("WANDB_RUN_ID", "WANDB_RESUME")}
    if history.get("wandb_id"):
        os.environ["WANDB_RUN_ID"], os.environ["WANDB_RESUME"] = history["wandb_id"], "allow"
    try:
        return init_wandb(wcfg, run_dir, f"sae-{name}", {"sae": asdict(c)})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _remove_checkpoint(ckpt_dir: Path) -> None:
    """The final artifacts supersede the checkpoint (a rerun then sees a finished SAE)."""
    for p in ("state.json", "state.safetensors"):
        (ckpt_dir / p).unlink(missing_ok=True)
    try:
        ckpt_dir.rmdir()
    except OSError:
        pass


def _summary(name: str, metrics: dict[str, Any], sae_dir: Path, training: dict[str, Any]) -> dict[str, Any]:
    g = "model_performance_preservation/"
    return {
        "name": name,
        "l0": metrics.get("metrics/l0"),
        "explained_variance": metrics.get("metrics/explained_variance"),
        "dead_fraction": metrics.get("sparsity/dead_fraction"),
        "dense_fraction": metrics.get("sparsity/dense_fraction"),
        "loss_recovered": metrics.get("metrics/loss_recovered"),
        "mse": metrics.get("losses/mse_loss"),
        "nll_original": metrics.get(g + "ce_loss_without_sae"),
        "nll_reconstructed": metrics.get(g + "ce_loss_with_sae"),
        "nll_zero_ablation": metrics.get(g + "ce_loss_with_ablation"),
        "steps": training.get("steps"),
        "rows": training.get("rows"),
        "resampled": sum(r["count"] for r in training.get("resampled", [])),
        "path": str(sae_dir),
    }


def _summary_line(s: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    return (f"sae {s['name']}: L0 {f(s['l0'], '.1f')}, "
            f"explained variance {f(s['explained_variance'], '.3f')}, "
            f"dead {f(s['dead_fraction'], '.1%')}, dense {f(s['dense_fraction'], '.1%')}, "
            f"loss recovered {f(s['loss_recovered'], '.3f')}, mse {f(s['mse'], '.4g')}, "
            f"{s['steps']} steps, {s['resampled']} resampled -> {s['path']}")


main = stage_main(run)

if __name__ == "__main__":
    main()

