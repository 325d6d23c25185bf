"""Held-out evaluation of an SAE during and after training, its W&B record, and the run summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from autoencoder.metrics import RowStats, log10_density, loss_recovered, val_contexts
from autoencoder.saes import SAE
from tools.core.config import UserError
from tools.core.layout import RunLayout

if TYPE_CHECKING:
    from autoencoder.config import SAETrainConfig


class Evaluator:
    """Held-out figures: reconstruction and density on val rows, NLL scores on val contexts.

    A transcoder (`hook_out` set) is scored on the paired val rows of its input and output hook
    points, and its loss recovered splices its output in place of `hook_out` (the MLP's output).
    """

    def __init__(self, cfg: DictConfig, c: SAETrainConfig, run_dir: Path, d_in: int, hook_name: str,
                 device: str, log, hook_out: str | None = None, d_out: int | None = None):
        self.c, self.device, self.log, self.hook = c, device, log, hook_name
        self.hook_out = hook_out
        self.model, self.contexts = self.load_model(cfg, run_dir, d_in)
        self.rows, self.source = self.load_rows(run_dir, d_in)
        self.targets = None
        if hook_out is not None:
            self.targets = self.load_targets(run_dir, d_out)
            if self.targets is None:
                self.rows = None
        for rows in (self.rows, self.targets):
            if rows is not None and not torch.isfinite(rows).all():
                raise UserError(f"validation activations from {self.source} contain NaN/Inf")

    def load_model(self, cfg: DictConfig, run_dir: Path, d_in: int):
        """(subject, val contexts) for loss recovered, or (None, None) when either is missing."""
        from transformer.data import token_dir
        from transformer.subject_load import load_subject, subject_config

        val_bin = token_dir(cfg) / "val.bin"
        self.val_bin = val_bin
        model_dir = RunLayout(run_dir).transformer
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
        from autoencoder.shard_rows import take_rows

        lay = RunLayout(run_dir)
        try:
            val_dir = lay.activations("val", self.hook)
        except UserError:  # no val shards of this hook: the val contexts' activations below
            val_dir = lay.activations_split("val") / "none"
        self.in_dir = val_dir
        if (val_dir / "manifest.json").is_file():
            return take_rows(val_dir, self.c.eval_rows, seed=0, d_in=d_in), str(val_dir)
        if self.model is not None:
            acts = []
            for i in range(0, self.contexts.shape[0], 16):
                h = self.model.capture(self.contexts[i:i + 16, :-1].to(self.device), [self.hook])[self.hook]
                acts.append(h.reshape(-1, h.shape[-1]).float().cpu())
            return torch.cat(acts)[: self.c.eval_rows], f"{self.val_bin} contexts"
        self.log(f"note: no val shards at {val_dir} and no model: held-out row metrics are skipped")
        return None, None

    def load_targets(self, run_dir: Path, d_out: int | None) -> torch.Tensor | None:
        """A transcoder's output rows paired with `rows` (same seed, same shard layout), or None."""
        from autoencoder.paired import require_paired
        from autoencoder.shard_check import read_manifest
        from autoencoder.shard_rows import take_rows

        lay = RunLayout(run_dir)
        try:
            out_dir = lay.activations("val", self.hook_out)
        except UserError:
            out_dir = None
        if self.rows is None or out_dir is None or self.source != str(self.in_dir):
            self.log(f"note: no paired val shards of {self.hook} and {self.hook_out}: "
                     "held-out metrics skipped")
            return None
        require_paired(read_manifest(self.in_dir), read_manifest(out_dir), self.in_dir, out_dir)
        return take_rows(out_dir, self.c.eval_rows, seed=0, d_in=d_out)

    @torch.no_grad()
    def __call__(self, sae: SAE) -> tuple[dict[str, float], torch.Tensor | None]:
        out: dict[str, float] = {}
        density = None
        was_training = sae.training
        sae.eval()
        if self.rows is not None:
            bs = 8192
            stats = RowStats(sae.cfg.d_sae, self.c.mse_reduction)
            targets = self.rows if self.targets is None else self.targets
            for i in range(0, self.rows.shape[0], bs):
                x = self.rows[i:i + bs].to(self.device)
                f = sae.encode(x)
                stats.update(targets[i:i + bs].to(self.device), sae.reconstruct(x, f), f)
            out.update(stats.summary())
            density = stats.density()
        if self.model is not None:
            out.update(loss_recovered(self.model, sae, self.contexts, self.hook, hook_out=self.hook_out))
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
