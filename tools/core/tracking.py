"""Weights & Biases runs, configured by the top-level `wandb` config section."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.core.config import UserError


@dataclass
class WandbConfig:
    """The top-level `wandb` section (every stage that logs reads it)."""

    mode: str = "offline"  # online | offline | disabled (WANDB_MODE in the environment wins)
    project: str = "monosemantic"  # W&B project of every run
    entity: str | None = None  # W&B entity (team or user); null = the logged-in default
    group: str | None = None  # W&B group, e.g. one sweep


def init_wandb(cfg: WandbConfig, run_dir: Path, name: str, config: dict[str, Any]) -> Any:
    """Start a W&B run writing under `run_dir/wandb`; None when disabled.

    `WANDB_MODE` in the environment wins over the config, as W&B users expect.
    """
    mode = os.environ.get("WANDB_MODE", cfg.mode)
    if mode not in ("online", "offline", "disabled"):
        raise UserError(f"wandb.mode must be online, offline or disabled, not {mode!r}")
    if mode == "disabled":
        return None
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.project, entity=cfg.entity, group=cfg.group, name=name, mode=mode,
        dir=str(run_dir), config=config, reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
