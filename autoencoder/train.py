"""Train a sparse autoencoder on activation shards: `python -m autoencoder.train run_dir=...`.

Reads `run_dir/activations/train` (+ `resample.npy`), evaluates on `run_dir/activations/val` and
on held-out val token contexts (`data_dir/<data.name>/val.bin` through the model in
`run_dir/transformer`), and writes `run_dir/sae/<name>/` (`sae_weights.safetensors`, `cfg.json`,
`sparsity.safetensors`, `density_histogram.png`, `checkpoint/`).

This module is the stage: the `sae` config section, the SAE's folder name, `done` and `run`.
The run itself is `autoencoder.trainer.Trainer` (step, resample, evaluate, checkpoint, finish);
it runs under `torchrun` and resumes exactly from `checkpoint/`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from autoencoder.evaluator import summary
from autoencoder.sae import ARCHITECTURES
from autoencoder.trainer import RunSpec, Trainer
from tools.core import guard
from tools.core.config import UserError, resolve_device, stage_main, typed
from tools.core.distributed import Dist
from tools.core.files import config_hash, read_json


@dataclass
class SAETrainConfig:
    """The `sae` config section (conf/sae/*.yaml documents every key)."""

    architecture: str = "l1"  # l1 (Anthropic 2023) | topk (Gao et al. 2024)
    name: str | None = None  # folder under run_dir/sae; null -> derived from the config
    hook: str | None = None  # hook point to train on when the shards hold several (blocks.10.mlp.hook_post)
    n_features: int = 4096
    d_in: int | None = None  # null -> from the shards' manifest; set it to assert it
    l1_coeff: float = 0.06  # λ on ‖f‖₁ / s (normalize_loss) or on ‖f‖₁ (raw)
    l1_warmup_steps: int = 0
    mse_reduction: str = "sum"  # sum | mean: over d_in, per row; always averaged over the batch
    normalize_loss: bool = True  # MSE / s² + λ ‖f‖₁ / s, s = RMS ‖x − b_dec‖ at init (false: raw)
    init_rescale: bool = True  # scale W_enc so the first reconstruction has the input's norm
    k: int = 32
    aux_k: int | None = None  # null -> d_in // 2 (Gao et al.)
    aux_coeff: float = 0.03125
    dead_tokens: int = 10_000_000  # rows without firing before a feature is dead (AuxK, resampling)
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
    resample_rows: int | None = None  # cap on rows of resample.npy used; null = all
    resample_enc_scale: float = 0.2
    resample_centered: bool = True  # new direction x − b_dec (false: the raw input x, the paper)
    resample_density: float | None = 0.01  # new bias fires on this fraction (null: bias 0, the paper)
    resample_fresh_adam: bool = True  # reset per-feature Adam step counts too (false: moments only)
    resample_max_fraction: float = 1.0  # at most this fraction of the dictionary per event
    resample_weight: str = "loss"  # loss (MSE + λ L1, the paper) | mse: what inputs are drawn by
    resample_lr_warmup_steps: int = 0
    resample_watch_steps: int = 200  # diagnostics: steps watched after each event
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
NON_MATH_KEYS = ("name", "hook", "kernel", "eval_every", "eval_rows", "eval_contexts", "eval_context_len",
                 "log_every", "checkpoint_every", "compile", "stop_at", "autocast",
                 "resample_watch_steps")


def check_config(c: SAETrainConfig) -> SAETrainConfig:
    def bad(key: str, want: str) -> UserError:
        return UserError(f"config `sae.{key}`={getattr(c, key)!r}: expected {want}")

    if c.architecture not in ARCHITECTURES:
        raise bad("architecture", " or ".join(ARCHITECTURES))
    for key in ("n_features", "batch_size", "steps", "log_every", "eval_every", "checkpoint_every",
                "b_dec_init_rows", "eval_rows", "dead_tokens", "resample_watch_steps"):
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
    if c.resample_density is not None and not 0 < c.resample_density < 1:
        raise bad("resample_density", "a fraction in (0, 1) or null")
    if not 0 < c.resample_max_fraction <= 1:
        raise bad("resample_max_fraction", "a fraction in (0, 1]")
    if c.resample_weight not in ("loss", "mse"):
        raise bad("resample_weight", "loss or mse")
    return c


def math_config(c: SAETrainConfig, d_in: int, world_size: int) -> dict[str, Any]:
    """The keys a checkpoint must share with the run that resumes it."""
    d = {k: v for k, v in asdict(c).items() if k not in NON_MATH_KEYS}
    return {**d, "d_in": d_in, "world_size": world_size}


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
            if isinstance(val, float):
                tag = _short(val)
            elif isinstance(val, (list, tuple)):  # e.g. resample_steps: how many, not which
                tag = str(len(val))
            else:
                tag = str(val).replace("/", "_").replace(" ", "")
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


# ---- the stage ------------------------------------------------------------------------------
def _paths(cfg: DictConfig, name: str) -> tuple[Path, Path, Path]:
    from autoencoder.generate import activation_dir

    run_dir = Path(str(cfg.run_dir))
    hook = cfg.sae.get("hook")
    return run_dir, activation_dir(run_dir, "train", hook), run_dir / "sae" / name


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
    from autoencoder import shard_check

    manifest = shard_check.read_manifest(train_dir)
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
    from autoencoder import shard_check

    c = check_config(typed(cfg.sae, SAETrainConfig, "sae"))
    from tools.core.tracking import WandbConfig, init_wandb

    wcfg = typed(cfg.wandb, WandbConfig, "wandb")
    device = resolve_device(str(cfg.device))
    name = sae_name(c, _multirun_overrides())
    run_dir, train_dir, sae_dir = _paths(cfg, name)
    ckpt_dir = sae_dir / "checkpoint"

    manifest = shard_check.read_manifest(train_dir)
    d_in = int(manifest["d_in"])
    if c.d_in is not None and c.d_in != d_in:
        raise UserError(f"config `sae.d_in`={c.d_in} but the shards in {train_dir} have d_in={d_in}")
    if c.architecture == "topk" and c.k > c.n_features:
        raise UserError(f"config `sae.k`={c.k} exceeds `sae.n_features`={c.n_features}")

    if done(cfg) and not (ckpt_dir / "state.json").is_file():
        meta = read_json(sae_dir / "cfg.json", "SAE config")
        print(f"sae {name}: already trained under this config -> {sae_dir}")
        return summary(name, meta.get("metrics", {}), sae_dir, meta.get("training", {}))
    dist = Dist.start(device)
    rank, world = dist.rank, dist.world
    try:
        if c.batch_size % world:
            raise UserError(f"config `sae.batch_size`={c.batch_size} must be divisible by the "
                            f"{world} DDP ranks")
        device = dist.device(device)
        expect = {**math_config(c, d_in, world),
                  "shards": config_hash([e.get("sha256") for e in manifest.get("shards", [])])}
        spec = RunSpec(cfg=cfg, c=c, name=name, run_dir=run_dir, train_dir=train_dir, sae_dir=sae_dir,
                       manifest=manifest, device=device, expect=expect,
                       stage_hash=_stage_hash(c, manifest, world), rank=rank, world=world)
        return Trainer(spec, lambda history: _wandb(init_wandb, wcfg, run_dir, name, c, history)).fit()
    finally:
        dist.close()




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




main = stage_main(run)

if __name__ == "__main__":
    main()
