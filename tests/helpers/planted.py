"""Planted-feature shard folders for SAE training tests (sparse combinations of known directions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from autoencoder.shard_write import write_shards
from autoencoder.synthetic import ground_truth, sparse_rows
from tools.core.config import compose


def planted_run(root: Path, d: int = 16, n_true: int = 32, rows: int = 24000, hooks: tuple[str, ...] = ()
                ) -> torch.Tensor:
    """`root/activations/{train,val}` of planted rows; returns the true features. With `hooks`, one
    folder per hook point (row i the same token): the first holds x, the others fixed linear maps of x."""
    g = torch.Generator().manual_seed(0)
    feats = ground_truth(n_true, d, g)
    x = sparse_rows(feats, rows, 0.05, g)
    outs = {h: x if i == 0 else x @ torch.randn(d, d, generator=g) / d ** 0.5 for i, h in enumerate(hooks)}
    for name, data in (outs or {None: x}).items():
        a = data.numpy().astype(np.float16)
        tr, va = (root / "activations" / split / (name or "") for split in ("train", "val"))
        hook = name or "blocks.0.mlp.hook_post"
        cut = rows * 5 // 6
        write_shards(tr, a[:cut], 5000, resample_rows=2048, hook_name=hook, rows_key="planted-train")
        write_shards(va, a[cut:], 4000, split="val", resample_rows=0, hook_name=hook,
                     rows_key="planted-val")
    return feats


def clone_run(src: Path, dst: Path) -> Path:
    """A run folder sharing `src`'s shards (symlinked) with its own sae/ output."""
    (dst / "activations").mkdir(parents=True)
    for split in ("train", "val"):
        (dst / "activations" / split).symlink_to(src / "activations" / split)
    return dst


def sae_cfg(run_dir: Path, *extra: str):
    """A small CPU SAE training config on `run_dir` (no W&B, no model)."""
    return compose([f"run_dir={run_dir}", "wandb.mode=disabled", "device=cpu", "data_dir=/nonexistent",
                    "sae.n_features=64", "sae.batch_size=128", "sae.lr=3e-3", "sae.lr_warmup_steps=20",
                    "sae.log_every=50", "sae.kernel=dense", *extra])
