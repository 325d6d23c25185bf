"""One SAE training run as an object: `Trainer(spec, ...).fit()`.

The state of a run (SAE, optimizer, shard reader, firing record, resampling history and watch,
evaluator, W&B run) lives on the `Trainer`; `fit` reads top to bottom:

    while step < steps:  step() -> resample() at scheduled steps -> evaluate() / checkpoint()
    finish()             final evaluation and artifacts

`TrainStep` (forward, loss, backward, all-reduce, Adam, decoder renorm) is the hot path, also what
tools/bench times. Under `torchrun` every rank runs the same loop on its own rows (gradients and
firing masks all-reduced); a run resumes exactly from `checkpoint/`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from autoencoder import checkpoint as ckpt
from autoencoder.evaluator import Evaluator, log_eval, summary, summary_line
from autoencoder.metrics import explained_variance, log10_density, save_density_histogram
from autoencoder.optim import FeatureAdam
from autoencoder.resample import ResampleRecipe, load_resample_set, resample_dead
from autoencoder.resample_watch import ResampleWatch
from autoencoder.sae import ARCHITECTURES, SAE, SAEModelConfig, build_sae, row_sq_error, save_sae
from transformer.config import UserError

if TYPE_CHECKING:
    from autoencoder.train import SAETrainConfig

PARAMS = ckpt.PARAMS


# ---- one training step ----------------------------------------------------------------------
class TrainStep:
    """Forward, loss, backward, (DDP all-reduce), parallel-gradient removal, Adam, decoder renorm.

    `step(x, l1_coeff=None, dead_mask=None) -> dict` of detached tensors: `loss`, `mse`,
    `sparsity` (λ-free L1 or AuxK), `l0`, `fired` (bool [d_sae]: fired on this batch). No host
    sync happens inside, so a benchmark can time it back to back. `input_scale` s (set by the
    trainer when `sae.normalize_loss`) divides the MSE term by s² and the L1 term by s.
    """

    def __init__(self, sae: SAE, optimizer: torch.optim.Optimizer, cfg: SAETrainConfig,
                 world_size: int = 1, input_scale: float = 1.0):
        self.sae, self.optimizer, self.cfg, self.world_size = sae, optimizer, cfg, world_size
        self.l1_coeff = cfg.l1_coeff
        self.aux_k = cfg.aux_k or max(1, sae.cfg.d_in // 2)
        self.params = [getattr(sae, n) for n in PARAMS]
        self.loss_fn = torch.compile(sae.loss) if cfg.compile else sae.loss
        self.set_scale(input_scale)
        dev = sae.W_dec.device.type
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.autocast and dev == "cuda" else torch.autocast(dev, enabled=False))

    def set_scale(self, s: float) -> None:
        """MSE and L1 divisors for an input RMS norm `s` (summed over d_in; /d_in under `mean`)."""
        self.input_scale = s
        self.mse_scale = s * s / (self.sae.cfg.d_in if self.cfg.mse_reduction == "mean" else 1)
        self.l1_scale = s

    def __call__(self, x: torch.Tensor, l1_coeff: float | None = None,
                 dead_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with self.autocast:
            t = self.loss_fn(x, l1_coeff=self.l1_coeff if l1_coeff is None else l1_coeff,
                             mse_reduction=self.cfg.mse_reduction, dead_mask=dead_mask,
                             aux_k=self.aux_k, aux_coeff=self.cfg.aux_coeff,
                             mse_scale=self.mse_scale, l1_scale=self.l1_scale,
                             batch_sum=self._batch_sum if self.world_size > 1 else None)
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

    def row_loss(self, x: torch.Tensor, l1_coeff: float) -> torch.Tensor:
        """The training loss of each row (no AuxK): what resampling weights inputs by."""
        f = self.sae.encode(x)
        mse = row_sq_error(x, self.sae.decode(f), self.cfg.mse_reduction) / self.mse_scale
        if self.cfg.architecture == "topk":
            return mse
        return mse + l1_coeff * f.float().sum(-1) / self.l1_scale

    @staticmethod
    def _batch_sum(t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a (detached) statistic of the batch."""
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

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


def make_optimizer(sae: SAE, cfg: SAETrainConfig) -> FeatureAdam:
    """Adam with per-feature step counts (`autoencoder.optim`), so resampled features restart."""
    return FeatureAdam([(n, getattr(sae, n)) for n in PARAMS], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


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


def dead_steps(c: SAETrainConfig) -> int:
    """`sae.dead_tokens` in steps: a feature silent this many steps counts as dead."""
    return max(1, math.ceil(c.dead_tokens / c.batch_size))


def recipe(c: SAETrainConfig) -> ResampleRecipe:
    return ResampleRecipe(enc_scale=c.resample_enc_scale, centered=c.resample_centered,
                          density=c.resample_density, fresh_adam=c.resample_fresh_adam,
                          max_fraction=c.resample_max_fraction)


# ---- the run --------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """What the stage resolved before training: config, names, paths, shards, ranks."""

    cfg: DictConfig  # the whole config (seed, data_dir, wandb, ...)
    c: SAETrainConfig  # its `sae` section, checked
    name: str
    run_dir: Path
    train_dir: Path
    sae_dir: Path
    manifest: dict[str, Any]
    device: str
    expect: dict[str, Any]  # math config + shards: a checkpoint must have been written under it
    stage_hash: str
    rank: int = 0
    world: int = 1

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def hook_name(self) -> str:
        return str(self.manifest.get("hook_name", "blocks.0.mlp.hook_post"))

    @property
    def ckpt_dir(self) -> Path:
        return self.sae_dir / "checkpoint"


class Trainer:
    """A training run's state and its five operations: step, resample, evaluate, checkpoint, finish."""

    def __init__(self, spec: RunSpec, open_wandb: Callable[[dict[str, Any]], Any]):
        from autoencoder import shards

        self.spec, c, dev = spec, spec.c, spec.device
        self.c, self.is_main = c, spec.rank == 0
        self.log = print if self.is_main else (lambda *a, **k: None)
        torch.manual_seed(int(spec.cfg.seed))
        gen = torch.Generator().manual_seed(int(spec.cfg.seed))
        mcfg = SAEModelConfig(architecture=ARCHITECTURES[c.architecture], d_in=spec.d_in,
                              d_sae=c.n_features, k=c.k if c.architecture == "topk" else None,
                              hook_name=spec.hook_name, dtype=c.dtype)
        sae = build_sae(mcfg, kernel=c.kernel)
        sae.reset_parameters(generator=gen)
        self.sae = sae.to(device=dev, dtype=getattr(torch, c.dtype))
        self.optimizer = make_optimizer(self.sae, c)
        self.step_fn = TrainStep(self.sae, self.optimizer, c, spec.world)
        self.schedule = sorted(s for s in set(c.resample_steps) if s < c.steps)
        self.resample_x = None
        if self.schedule:
            x = load_resample_set(spec.train_dir / "resample.npy", spec.d_in)
            self.resample_x = x[: c.resample_rows or None].to(device=dev, dtype=self.sae.W_dec.dtype)
        self.reader = shards.ShardReader(spec.train_dir, c.batch_size // spec.world, seed=int(spec.cfg.seed),
                                         rank=spec.rank, world_size=spec.world,
                                         dtype=getattr(torch, c.dtype), device=dev)
        self.dead_after = dead_steps(c)
        self.watch = ResampleWatch(self.schedule, c.n_features, dev, after=c.resample_watch_steps)
        self.step_no, self.last_fired = 0, torch.zeros(c.n_features, dtype=torch.long, device=dev)
        self.history: dict[str, Any] = {"resampled": [], "wandb_id": None, "init": {}}
        if (spec.ckpt_dir / "state.json").is_file():
            self._resume()
        else:
            self._initialise()
        self.wb = None
        if self.is_main:
            self.wb = open_wandb(self.history)
            self.history["wandb_id"] = getattr(self.wb, "id", None)
        self.evaluator = (Evaluator(spec.cfg, c, spec.run_dir, spec.d_in, spec.hook_name, dev, self.log)
                          if self.is_main else None)
        self.it = iter(self.reader)
        self.acc: dict[str, torch.Tensor] = {}
        self.n_acc, self.t0, self.rows = 0, time.time(), 0

    def _initialise(self) -> None:
        """b_dec at the geometric median of a training sample, the encoder rescaled so the first
        reconstruction has the input's norm, the loss scale s = RMS ‖x − b_dec‖ (same on every rank:
        the sample is read with a fixed seed; rank 0's weights are broadcast anyway)."""
        from autoencoder.init import init_from_sample, training_sample

        sample = training_sample(self.spec.train_dir, self.c.b_dec_init_rows)
        self.history["init"] = init_from_sample(self.sae, sample, self.c, self.log)
        self.step_fn.set_scale(self.history["init"]["input_scale"])
        if self.spec.world > 1:
            for n in PARAMS:
                dist.broadcast(getattr(self.sae, n).data, 0)

    def _resume(self) -> None:
        step, tensors, meta = ckpt.load_checkpoint(self.spec.ckpt_dir, sae=self.sae,
                                                   optimizer=self.optimizer, expect=self.spec.expect)
        self.step_no, self.last_fired = step, tensors["last_fired"]
        self.reader.load_state_dict(meta["readers"][self.spec.rank])
        self.history = {k: meta[k] for k in ("resampled", "wandb_id", "init")}
        self.step_fn.set_scale(self.history["init"]["input_scale"])
        self.watch.restore(meta["watch"], tensors, self.history["resampled"])
        self.log(f"sae {self.spec.name}: resuming from {self.spec.ckpt_dir} at step {step}")

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to `sae.steps` (or `sae.stop_at`), then write the artifacts; returns the summary."""
        from tqdm import tqdm

        c = self.c
        self.bar = tqdm(total=c.steps, initial=self.step_no, desc=f"sae {self.spec.name}",
                        disable=not self.is_main, unit="step", dynamic_ncols=True)
        try:
            while self.step_no < c.steps:
                self.step()
                if self.step_no in self.schedule:
                    self.resample()
                if self.step_no % c.eval_every == 0 and self.step_no < c.steps:
                    self.evaluate()
                if self.step_no % c.checkpoint_every == 0 and self.step_no < c.steps:
                    self.checkpoint()
                if c.stop_at is not None and c.stop_at <= self.step_no < c.steps:
                    self.checkpoint()
                    self.log(f"\nsae {self.spec.name}: stopped at step {self.step_no} (sae.stop_at); "
                             "resume by running again")
                    return {"name": self.spec.name, "stopped_at": self.step_no,
                            "path": str(self.spec.sae_dir)}
        finally:
            self.bar.close()
            self.reader.close()
        return self.finish()

    def step(self) -> None:
        """One optimizer step on the next batch, then the firing record, logs and watch."""
        c, step = self.c, self.step_no
        last_rs = max((r["step"] for r in self.history["resampled"]), default=None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, c, last_rs)
        x = next(self.it)
        if x.shape[1] != self.spec.d_in:
            raise UserError(f"shard rows in {self.spec.train_dir} have width {x.shape[1]}, "
                            f"manifest says {self.spec.d_in}")
        dead_mask = (step - self.last_fired) >= self.dead_after if c.architecture == "topk" else None
        out = self.step_fn(x, l1_coeff=l1_at(step, c), dead_mask=dead_mask)
        loss, fired = out["loss"].reshape(1), out["fired"].float()
        if self.spec.world > 1:  # one collective: the loss (for the NaN check) and the firing mask
            buf = torch.cat([loss, fired])
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)
            loss, fired = buf[:1], buf[1:]
        if not math.isfinite(float(loss)):
            what = "the input batch" if not torch.isfinite(x).all() else "the loss"
            raise UserError(f"non-finite values in {what} at step {step + 1} of sae {self.spec.name} "
                            f"(shards {self.spec.train_dir}); last good checkpoint: "
                            f"{ckpt.last_good(self.spec.ckpt_dir)}")
        self.step_no = step = step + 1
        self.last_fired[fired > 0] = step
        for key in ("loss", "mse", "sparsity", "l0"):
            self.acc[key] = self.acc.get(key, 0) + out[key].float()
        self.n_acc += 1
        self.rows += c.batch_size
        row = self.watch.record(step, float(out["mse"]), float(out["l0"]), fired > 0)
        if row is not None and self.wb is not None:
            self.wb.log(row, step=step)
        closed = self.watch.maybe_close(step, self.last_fired)
        if closed is not None:
            self._log_closed(closed)
        if step % c.log_every == 0 or step == c.steps:
            self._log_train(x)
        self.bar.update(1)

    def _log_train(self, x: torch.Tensor) -> None:
        c, step = self.c, self.step_no
        m = {k: float(v) / self.n_acc for k, v in self.acc.items()}
        with torch.no_grad():
            ev = explained_variance(x, self.sae(x))
        sparsity_key = "losses/l1_loss" if c.architecture == "l1" else "losses/auxiliary_reconstruction_loss"
        rec = {"losses/overall_loss": m["loss"], "losses/mse_loss": m["mse"], sparsity_key: m["sparsity"],
               "metrics/l0": m["l0"], "metrics/explained_variance": ev,
               "details/current_learning_rate": self.optimizer.param_groups[0]["lr"],
               "details/l1_coefficient": l1_at(step - 1, c),
               "sparsity/dead_in_window": int(((step - self.last_fired) >= self.dead_after).sum()),
               "details/rows_per_s": self.rows / max(time.time() - self.t0, 1e-9)}
        if self.wb is not None:
            self.wb.log(rec, step=step)
        self.bar.set_postfix(mse=f"{m['mse']:.4g}", l0=f"{m['l0']:.1f}", ev=f"{ev:.3f}")
        self.acc, self.n_acc = {}, 0

    def _log_closed(self, rec: dict[str, Any]) -> None:
        self.log(f"\nresampling at step {rec['step']}: {rec['revived']}/{rec['count']} resampled features "
                 f"fired in the next {rec['watched_steps']} steps; {rec['survived']}/{rec['alive_before']} "
                 "alive ones still fire")
        if self.wb is not None:
            self.wb.log({"resample/revived": rec["revived"], "resample/survived": rec["survived"]},
                        step=self.step_no)

    def resample(self) -> None:
        """Re-initialise the features silent for `sae.dead_tokens` rows (`autoencoder.resample`)."""
        step = self.step_no
        dead = (step - self.last_fired) >= self.dead_after
        # same seed on every rank and an all-reduced firing history: identical choices everywhere
        gen = torch.Generator().manual_seed(int(self.spec.cfg.seed) * 1_000_003 + step)
        lam = l1_at(step - 1, self.c)
        row_loss = (None if self.c.resample_weight == "mse"
                    else (lambda x: self.step_fn.row_loss(x, lam)))
        idx = resample_dead(self.sae, self.optimizer, dead, self.resample_x, generator=gen,
                            row_loss=row_loss, recipe=recipe(self.c))
        self.last_fired[idx] = step  # a fresh window for the new features
        rec = self.watch.event(step, idx, dead, self.last_fired)
        self.history["resampled"].append(rec)
        self.log(f"\nstep {step}: resampled {rec['count']} of {rec['dead']} dead features")
        if self.wb is not None:
            self.wb.log({"sparsity/resampled": rec["count"], "resample/dead": rec["dead"]}, step=step)

    def evaluate(self) -> None:
        """Held-out figures to W&B (rank 0)."""
        if self.evaluator is not None:
            metrics, dens = self.evaluator(self.sae)
            log_eval(self.wb, metrics, dens, self.step_no)

    def checkpoint(self) -> None:
        """Resume state (every rank's reader position gathered to rank 0)."""
        spec, step = self.spec, self.step_no
        readers = [self.reader.state_dict()]
        if spec.world > 1:
            gathered: list[Any] = [None] * spec.world
            dist.all_gather_object(gathered, readers[0])
            readers = gathered
        if self.is_main:
            for n in PARAMS:
                if not torch.isfinite(getattr(self.sae, n)).all():
                    raise UserError(f"non-finite {n} at step {step}: not checkpointing")
            ckpt.save_checkpoint(
                spec.ckpt_dir, sae=self.sae, optimizer=self.optimizer, step=step,
                tensors={"last_fired": self.last_fired, **self.watch.tensors()},
                state={"config": spec.expect, "config_hash": spec.stage_hash, "name": spec.name,
                       "readers": readers, "watch": self.watch.state(), "time": time.time(),
                       **self.history})
        if spec.world > 1:
            dist.barrier()

    def finish(self) -> dict[str, Any]:
        """Final evaluation, `sae_weights.safetensors` + `cfg.json` + density files (rank 0)."""
        spec, c, step = self.spec, self.c, self.step_no
        closed = self.watch.close(step, self.last_fired)
        if closed is not None:
            self._log_closed(closed)
        out: dict[str, Any] = {}
        if self.is_main:
            metrics, dens = self.evaluator(self.sae)
            if dens is None:
                dens = torch.zeros(c.n_features)
                self.log("note: no held-out rows: density and sparsity figures are not available")
            log_eval(self.wb, metrics, dens if self.evaluator.rows is not None else None, step)
            training = {"config": asdict(c), "config_hash": spec.stage_hash, "world_size": spec.world,
                        "steps": step, "rows": step * c.batch_size, "init": self.history["init"],
                        "resampled": self.history["resampled"], "shards": str(spec.train_dir),
                        "eval_source": self.evaluator.source, "seed": int(spec.cfg.seed)}
            metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
            logd = log10_density(dens)
            save_sae(self.sae, spec.sae_dir, {"training": training, "metrics": metrics}, sparsity_log10=logd)
            if self.evaluator.rows is not None:
                save_density_histogram(logd, spec.sae_dir / "density_histogram.png",
                                       f"{spec.name}: log10 feature density on "
                                       f"{self.evaluator.rows.shape[0]} val rows")
            out = summary(spec.name, metrics, spec.sae_dir, training)
            if self.wb is not None:
                self.wb.summary.update({k: v for k, v in out.items() if isinstance(v, (int, float))})
                self.wb.finish()
            ckpt.remove_checkpoint(spec.ckpt_dir)
            print(summary_line(out), flush=True)
        if spec.world > 1:
            box = [out]
            dist.broadcast_object_list(box, 0)
            out = box[0]
        return out
