"""One SAE training run as an object: `Trainer(spec, ...).fit()`.

The state of a run (SAE, optimizer, shard reader, firing record, resampling history and watch,
evaluator, W&B run) lives on the `Trainer`; `fit` reads top to bottom:

    while step < steps:  step() -> resample() at scheduled steps -> evaluate() / checkpoint()
    finish()             final evaluation and artifacts

The step itself is `autoencoder.step.TrainStep`. Under `torchrun` every rank runs the same loop
on its own rows (gradients and firing masks all-reduced); a run resumes exactly from `checkpoint/`.
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
from autoencoder.resample import load_resample_set, resample_dead
from autoencoder.resample_watch import ResampleWatch
from autoencoder.sae import save_sae
from autoencoder.saes import SAEModelConfig, arch_class, build_sae
from autoencoder.step import TrainStep, dead_steps, l1_at, lr_at, make_optimizer, recipe
from tools.core import preempt
from tools.core.config import UserError

if TYPE_CHECKING:
    from autoencoder.config import SAETrainConfig



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
    target_dir: Path | None = None  # transcoder: the shards of the rows it reconstructs
    target_manifest: dict[str, Any] | None = None

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def hook_name(self) -> str:
        return str(self.manifest.get("hook_name", "blocks.0.mlp.hook_post"))

    @property
    def d_out(self) -> int:
        return int((self.target_manifest or self.manifest)["d_in"])

    @property
    def hook_name_out(self) -> str | None:
        return None if self.target_manifest is None else str(self.target_manifest.get("hook_name"))

    def model_config(self) -> SAEModelConfig:
        """The SAE this run trains: the architecture's fields of `sae`, widths from the shards."""
        c = self.c
        tc = c.kind == "transcoder"
        return SAEModelConfig(architecture=arch_class(c.architecture).registry_key(), d_in=self.d_in,
                              d_sae=c.n_features, hook_name=self.hook_name, dtype=c.dtype, kind=c.kind,
                              d_out=self.d_out if tc else None, hook_name_out=self.hook_name_out,
                              skip=c.skip, **arch_class(c.architecture).model_fields(c))

    @property
    def ckpt_dir(self) -> Path:
        return self.sae_dir / "checkpoint"


class Trainer:
    """A training run's state and its five operations: step, resample, evaluate, checkpoint, finish."""

    def __init__(self, spec: RunSpec, open_wandb: Callable[[dict[str, Any]], Any]):
        from autoencoder import shard_reader

        self.spec, c, dev = spec, spec.c, spec.device
        self.c, self.is_main = c, spec.rank == 0
        self.log = print if self.is_main else (lambda *a, **k: None)
        torch.manual_seed(int(spec.cfg.seed))
        gen = torch.Generator().manual_seed(int(spec.cfg.seed))
        sae = build_sae(spec.model_config(), kernel=c.kernel)
        sae.reset_parameters(generator=gen)
        self.sae = sae.to(device=dev, dtype=getattr(torch, c.dtype))
        self.optimizer = make_optimizer(self.sae, c)
        self.step_fn = TrainStep(self.sae, self.optimizer, c, spec.world)
        self.schedule = sorted(s for s in set(c.resample_steps) if s < c.steps)
        self.resample_x = None
        if self.schedule:
            x = load_resample_set(spec.train_dir / "resample.npy", spec.d_in)
            self.resample_x = x[: c.resample_rows or None].to(device=dev, dtype=self.sae.W_dec.dtype)
        kw = {"seed": int(spec.cfg.seed), "rank": spec.rank, "world_size": spec.world,
              "dtype": getattr(torch, c.dtype), "device": dev}
        if spec.target_dir is None:
            self.reader = shard_reader.ShardReader(spec.train_dir, c.batch_size // spec.world, **kw)
        else:
            from autoencoder.paired import PairedReader

            self.reader = PairedReader(spec.train_dir, spec.target_dir, c.batch_size // spec.world, **kw)
        self.dead_after, self.aux_dead_after = dead_steps(c), dead_steps(c, aux=True)
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
        self.evaluator = (Evaluator(spec.cfg, c, spec.run_dir, spec.d_in, spec.hook_name, dev, self.log,
                                    hook_out=spec.hook_name_out, d_out=spec.d_out)
                          if self.is_main else None)
        self.it = iter(self.reader)
        self.acc: dict[str, torch.Tensor] = {}
        self.n_acc, self.t0, self.rows = 0, time.time(), 0
        self.stop_requested = False  # SIGTERM/SIGINT on some rank: checkpoint and stop after this step

    def _initialise(self) -> None:
        """b_dec at the geometric median of a training sample, the encoder rescaled so the first
        reconstruction has the input's norm, the loss scale s = RMS ‖x − b_dec‖ (same on every rank:
        the sample is read with a fixed seed; rank 0's weights are broadcast anyway)."""
        from autoencoder.init import init_from_sample, training_sample

        sample = training_sample(self.spec.train_dir, self.c.b_dec_init_rows)
        paired = ({} if self.spec.target_dir is None
                  else {"target": training_sample(self.spec.target_dir, self.c.b_dec_init_rows)})
        self.history["init"] = init_from_sample(self.sae, sample, self.c, self.log, **paired)
        self.step_fn.set_scale(self.history["init"]["input_scale"])
        if self.spec.world > 1:
            for n in self.sae.state_names():
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
                saved = self.step_no % c.checkpoint_every == 0 and self.step_no < c.steps
                if saved:
                    self.checkpoint()
                if self.stop_requested and self.step_no < c.steps:
                    if not saved:
                        self.checkpoint()
                    raise preempt.Preempted(f"sae {self.spec.name}", f"step {self.step_no}",
                                            preempt.saved_hint(self.spec.ckpt_dir))
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
        batch = next(self.it)
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        if x.shape[1] != self.spec.d_in:
            raise UserError(f"shard rows in {self.spec.train_dir} have width {x.shape[1]}, "
                            f"manifest says {self.spec.d_in}")
        dead_mask = (step - self.last_fired) >= self.aux_dead_after if self.sae.uses_dead_mask else None
        out = self.step_fn(x, l1_coeff=l1_at(step, c, self.step_fn.coeff_name), dead_mask=dead_mask,
                           target=y)
        loss, fired = out["loss"].reshape(1), out["fired"].float()
        self.stop_requested = preempt.requested()
        if self.spec.world > 1:  # one collective: the loss (NaN check), SIGTERM on any rank, firing mask
            flag = torch.full_like(loss, float(self.stop_requested))
            buf = torch.cat([loss, flag, fired])
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)
            loss, fired, self.stop_requested = buf[:1], buf[2:], bool(buf[1] > 0)
        if not math.isfinite(float(loss)):
            what = "the input batch" if not torch.isfinite(x).all() else "the loss"
            raise UserError(f"non-finite values in {what} at step {step + 1} of sae {self.spec.name} "
                            f"(shards {self.spec.train_dir}); last good checkpoint: "
                            f"{ckpt.last_good(self.spec.ckpt_dir)}")
        self.step_no = step = step + 1
        self.last_fired[fired > 0] = step
        for key, v in out.items():
            if key != "fired":
                self.acc[key] = self.acc.get(key, 0) + v.float()
        self.n_acc += 1
        self.rows += c.batch_size
        row = self.watch.record(step, float(out["mse"]), float(out["l0"]), fired > 0)
        if row is not None and self.wb is not None:
            self.wb.log(row, step=step)
        closed = self.watch.maybe_close(step, self.last_fired)
        if closed is not None:
            self._log_closed(closed)
        if step % c.log_every == 0 or step == c.steps:
            self._log_train(x, y)
        self.bar.update(1)

    def _log_train(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        c, step = self.c, self.step_no
        m = {k: float(v) / self.n_acc for k, v in self.acc.items()}
        with torch.no_grad():
            ev = explained_variance(x if y is None else y, self.sae(x))
        known = ("loss", "mse", "sparsity", "l0")
        rec = {"losses/overall_loss": m["loss"], "losses/mse_loss": m["mse"],
               self.sae.sparsity_log_key: m["sparsity"],
               "metrics/l0": m["l0"], "metrics/explained_variance": ev,
               **{f"losses/{k}": v for k, v in m.items() if k not in known},
               "details/current_learning_rate": self.optimizer.param_groups[0]["lr"],
               "details/l1_coefficient": l1_at(step - 1, c, self.step_fn.coeff_name),
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
        lam = l1_at(step - 1, self.c, self.step_fn.coeff_name)
        row_loss = (None if self.c.resample_weight == "mse"
                    else (lambda x: self.step_fn.row_loss(x, lam)))
        idx = resample_dead(self.sae, self.optimizer, dead, self.resample_x, generator=gen,
                            row_loss=row_loss, recipe=recipe(self.c))
        self.last_fired[idx] = step  # a fresh window for the new features
        rec = self.watch.event(step, idx, dead, self.last_fired)
        rec.update(self._new_feature_reach(idx))
        self.history["resampled"].append(rec)
        self.log(f"\nstep {step}: resampled {rec['count']} of {rec['dead']} dead features")
        if self.wb is not None:
            self.wb.log({"sparsity/resampled": rec["count"], "resample/dead": rec["dead"]}, step=step)

    @torch.no_grad()
    def _new_feature_reach(self, idx: torch.Tensor) -> dict[str, float]:
        """Right after resampling, on (up to 4,096 rows of) the resampling subset: the mean fraction
        of rows each new feature fires on, and the RMS norm of the new features' joint
        contribution f_new W_dec[new] relative to that of x − b_dec (the collateral shock)."""
        if idx.numel() == 0:
            return {"new_density": 0.0, "new_recon_ratio": 0.0}
        x = self.resample_x[:4096]
        f = self.sae.encode(x)[:, idx]
        add = f @ self.sae.W_dec[idx]
        ratio = add.pow(2).sum(-1).mean().sqrt() / (x - self.sae.b_dec).pow(2).sum(-1).mean().sqrt()
        return {"new_density": float((f > 0).float().mean()), "new_recon_ratio": float(ratio)}

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
            for n in self.sae.state_names():
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
