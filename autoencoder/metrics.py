"""SAE quality figures: reconstruction, sparsity, feature density, and the reconstructed-NLL score.

Names follow SAELens where one exists (`losses/mse_loss`, `metrics/l0`, `sparsity/dead_features`,
...). Evaluation uses held-out rows (val shards, or activations computed from val contexts) and
val token contexts, never training rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from autoencoder.saes import SAE, row_sq_error
from tools.core.config import UserError
from transformer.subject import Subject, splice_edits

DENSE_THRESHOLD = 0.1  # a feature firing on > 10% of tokens is "dense" (Anthropic 2023 uses 1e-1 too)
LOG_EPS = 1e-10  # SAELens' log10(density + 1e-10) convention for sparsity.safetensors


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (x̄ the batch mean): the pooled ratio, which unlike
    a mean of per-row ratios is not dominated by near-zero rows."""
    x = x.double()
    sse = (x - x_hat.double()).pow(2).sum()
    sst = (x - x.mean(0)).pow(2).sum()
    return float(1.0 - sse / sst.clamp_min(1e-30))


def log10_density(density: torch.Tensor) -> torch.Tensor:
    return torch.log10(density.double() + LOG_EPS).float()


def density_metrics(density: torch.Tensor) -> dict[str, float]:
    """Sparsity figures from per-feature firing frequencies [d_sae]."""
    n = density.numel()
    logd = log10_density(density)
    dead = int((density == 0).sum())
    dense = int((density > DENSE_THRESHOLD).sum())
    return {
        "sparsity/dead_features": dead,
        "sparsity/dead_fraction": dead / n,
        "sparsity/below_1e-5": int((density < 1e-5).sum()),
        "sparsity/below_1e-6": int((density < 1e-6).sum()),
        "sparsity/dense_features": dense,
        "sparsity/dense_fraction": dense / n,
        "metrics/mean_log10_feature_sparsity": float(logd.mean()),
    }


class RowStats:
    """Accumulates reconstruction and firing statistics over many batches of held-out rows."""

    def __init__(self, d_sae: int, mse_reduction: str):
        self.mse_reduction = mse_reduction
        self.fires = torch.zeros(d_sae, dtype=torch.float64)
        self.rows = 0
        self.sse = 0.0  # Σ‖x − x̂‖²
        self.loss_sum = 0.0  # Σ row loss under mse_reduction
        self.l0_sum = 0.0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x = x.double()
        fired = f > 0
        self.fires += fired.sum(0).double().cpu()
        self.l0_sum += float(fired.sum())
        self.rows += x.shape[0]
        self.sse += float((x - x_hat.double()).pow(2).sum())
        self.loss_sum += float(row_sq_error(x, x_hat, self.mse_reduction).sum())
        sx = x.sum(0).cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_sq += float(x.pow(2).sum())

    def density(self) -> torch.Tensor:
        return (self.fires / max(self.rows, 1)).float()

    def summary(self) -> dict[str, float]:
        if self.rows == 0:
            raise UserError("no evaluation rows were read")
        mean = self.sum_x / self.rows
        sst = self.sum_sq - self.rows * float(mean.pow(2).sum())
        out = {
            "losses/mse_loss": self.loss_sum / self.rows,
            "metrics/l0": self.l0_sum / self.rows,
            "metrics/explained_variance": 1.0 - self.sse / max(sst, 1e-30),
        }
        out.update(density_metrics(self.density()))
        return out


@torch.no_grad()
def evaluate_rows(sae: SAE, batches: Iterable[torch.Tensor], mse_reduction: str) -> RowStats:
    stats = RowStats(sae.cfg.d_sae, mse_reduction)
    for x in batches:
        f = sae.encode(x)
        stats.update(x, sae.decode(f), f)
    return stats


def val_contexts(val_bin: Path, n: int, ctx_len: int) -> torch.Tensor:
    """`n` contexts of `ctx_len + 1` tokens, evenly spaced over `val.bin` (the same every eval)."""
    from transformer.data import open_tokens

    val_bin = Path(val_bin)
    if not val_bin.is_file():
        raise UserError(f"validation tokens not found: {val_bin} (run transformer.prepare first)")
    tokens = open_tokens(val_bin.parent, val_bin.stem)
    span = ctx_len + 1
    if len(tokens) < span:
        raise UserError(f"{val_bin} has {len(tokens)} tokens, fewer than one context of {span}")
    n = max(1, min(n, len(tokens) // span))
    starts = np.linspace(0, len(tokens) - span, n).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + span].astype(np.int64) for s in starts]))


@torch.no_grad()
def loss_recovered(subject: Subject, sae: SAE, contexts: torch.Tensor, hook: str, batch_size: int = 4,
                   ablation: str = "zero", hook_out: str | None = None) -> dict[str, float]:
    """Next-token loss of the subject as is, with the SAE's reconstruction spliced into `hook`, and
    with that hook point ablated (`zero`, or `mean`: its mean over these contexts' positions); loss
    recovered = (L_abl − L_recon) / (L_abl − L_orig): 1 is a perfect reconstruction, 0 no better
    than ablating the hook point. SAELens' eval names.

    A transcoder reads `hook` and writes `hook_out` (the MLP's input and output): its output
    replaces `hook_out` (`transformer.subject.splice_edits`), and the ablation is of `hook_out`."""
    if ablation not in ("zero", "mean"):
        raise UserError(f"ablation must be zero or mean, not {ablation!r}")
    hook_in, hook = hook, hook_out or hook
    subject.check_hooks(sorted({hook_in, hook}))
    batches = [contexts[i:i + batch_size].to(subject.device) for i in range(0, contexts.shape[0], batch_size)]
    mean = None
    if ablation == "mean":
        total = None
        for ctx in batches:
            v = subject.capture(ctx[:, :-1], [hook])[hook].double().sum((0, 1))
            total = v if total is None else total + v
        mean = total / (contexts.shape[0] * (contexts.shape[1] - 1))

    def ablate(h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h) if mean is None else mean.to(h.dtype).expand_as(h)

    def splice(h: torch.Tensor) -> torch.Tensor:
        return sae(h.float()).to(h.dtype)

    totals = {"orig": 0.0, "recon": 0.0, "abl": 0.0}
    edits = {"orig": None, "recon": splice_edits(hook_in, hook, splice), "abl": {hook: ablate}}
    n_tok = 0
    for ctx in batches:
        idx, tgt = ctx[:, :-1].contiguous(), ctx[:, 1:].contiguous()
        n = tgt.numel()
        for mode in totals:
            totals[mode] += float(subject.loss(idx, tgt, edits[mode])) * n
        n_tok += n
    l_orig, l_recon, l_abl = (totals[k] / n_tok for k in ("orig", "recon", "abl"))
    denom = l_abl - l_orig
    recovered = (l_abl - l_recon) / denom if abs(denom) > 1e-12 else math.nan
    g = "model_performance_preservation/"
    return {g + "ce_loss_without_sae": l_orig, g + "ce_loss_with_sae": l_recon,
            g + "ce_loss_with_ablation": l_abl, g + "ce_loss_score": recovered,
            "metrics/loss_recovered": recovered}


def nll_scores(model: torch.nn.Module, sae: SAE, contexts: torch.Tensor, layer: int,
               batch_size: int = 4) -> dict[str, float]:
    """`loss_recovered` of our GPT's MLP neurons at `layer`, zero-ablated (the trainer's old entry point)."""
    from transformer.subject import GPTSubject, hook_point

    return loss_recovered(GPTSubject(model), sae, contexts, hook_point("neurons", layer), batch_size)


def save_density_histogram(log10_dens: torch.Tensor, path: Path, title: str) -> None:
    """PNG of the log10 feature-density histogram (dead features drawn at the far left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tools.core.files import atomic_path

    vals = log10_dens.detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(vals, bins=60, range=(math.log10(LOG_EPS), 0.0), color="#3b6ea8")
    ax.set_xlabel("log10 feature density (dead at -10)")
    ax.set_ylabel("features")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
