"""Held-out evaluation of an SAE during and after training, its W&B record, and the run summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from autoencoder.metrics import RowStats, evaluate_rows, log10_density, loss_recovered, val_contexts
from autoencoder.sae import SAE
from tools.core.config import UserError

if TYPE_CHECKING:
    from autoencoder.train import SAETrainConfig


class Evaluator:
    """Held-out figures: reconstruction and density on val rows, NLL scores on val contexts."""

    def __init__(self, cfg: DictConfig, c: SAETrainConfig, run_dir: Path, d_in: int, hook_name: str,
                 device: str, log):
        self.c, self.device, self.log, self.hook = c, device, log, hook_name
        self.model, self.contexts = self.load_model(cfg, run_dir, d_in)
        self.rows, self.source = self.load_rows(run_dir, d_in)
        if self.rows is not None and not torch.isfinite(self.rows).all():
            raise UserError(f"validation activations from {self.source} contain NaN/Inf")

    def load_model(self, cfg: DictConfig, run_dir: Path, d_in: int):
        """(subject, val contexts) for loss recovered, or (None, None) when either is missing."""
        from transformer.data import token_dir
        from transformer.subject_load import load_subject, subject_config

        val_bin = token_dir(cfg) / "val.bin"
        self.val_bin = val_bin
        model_dir = run_dir / "transformer"
        gpt = subject_config(cfg).kind == "gpt"
        if (gpt and not (model_dir / "config.json").is_file()) or not val_bin.is_file():
            self.log(f"note: no model at {model_dir} or no {val_bin}: loss recovered is not computed")
            return None, None
        subject = load_subject(cfg, self.device)
        width = subject.width(self.hook)
        if width != d_in:
            raise UserError(f"subject {subject.name}: hook {self.hook} has width {width} but the shards "
                            f"have d_in={d_in}")
        default = int(subject.spec.extra.get("default_context") or subject.max_context)
        ctx_len = min(self.c.eval_context_len or default, subject.max_context)
        return subject, val_contexts(val_bin, self.c.eval_contexts, ctx_len)

    def load_rows(self, run_dir: Path, d_in: int) -> tuple[torch.Tensor | None, str | None]:
        """Held-out rows: the val shards, else the activations of the val contexts."""
        from autoencoder import shard_check, shard_reader
        from autoencoder.generate import activation_dir

        try:
            val_dir = activation_dir(run_dir, "val", self.hook)
        except UserError:  # no val shards of this hook: the val contexts' activations below
            val_dir = run_dir / "activations" / "val" / "none"
        if (val_dir / "manifest.json").is_file():
            shard_check.read_manifest(val_dir, d_in=d_in)
            total = min(self.c.eval_rows, int(shard_check.read_manifest(val_dir)["total_rows"]))
            reader = shard_reader.ShardReader(val_dir, min(total, 8192), seed=0, device="cpu")
            try:
                got, parts = 0, []
                for b in reader:
                    parts.append(b[: total - got])
                    got += parts[-1].shape[0]
                    if got >= total:
                        break
            finally:
                reader.close()
            return torch.cat(parts), str(val_dir)
        if self.model is not None:
            acts = []
            for i in range(0, self.contexts.shape[0], 16):
                h = self.model.capture(self.contexts[i:i + 16, :-1].to(self.device), [self.hook])[self.hook]
                acts.append(h.reshape(-1, h.shape[-1]).float().cpu())
            return torch.cat(acts)[: self.c.eval_rows], f"{self.val_bin} contexts"
        self.log(f"note: no val shards at {val_dir} and no model: held-out row metrics are skipped")
        return None, None

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
            out.update(loss_recovered(self.model, sae, self.contexts, self.hook))
        sae.train(was_training)
        return out, density


def log_eval(wb, metrics: dict[str, float], density: torch.Tensor | None, step: int) -> None:
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


def summary(name: str, metrics: dict[str, Any], sae_dir: Path, training: dict[str, Any]) -> dict[str, Any]:
    """The stage's return value: headline figures of a finished SAE."""
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


def summary_line(s: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    return (f"sae {s['name']}: L0 {f(s['l0'], '.1f')}, "
            f"explained variance {f(s['explained_variance'], '.3f')}, "
            f"dead {f(s['dead_fraction'], '.1%')}, dense {f(s['dense_fraction'], '.1%')}, "
            f"loss recovered {f(s['loss_recovered'], '.3f')}, mse {f(s['mse'], '.4g')}, "
            f"{s['steps']} steps, {s['resampled']} resampled -> {s['path']}")
