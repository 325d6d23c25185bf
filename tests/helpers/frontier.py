"""What the tests of the library frontiers (tools/bench/saelens_frontier, dl_frontier) share: a budget
that trains in seconds on planted shards, and the check of the table files every such run writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def tiny_budget(run_dir: Path) -> list[str]:
    """Options and overrides for a few steps of 64 latents on `run_dir`'s planted shards."""
    return ["--no-budget", "--eval-rows", "400", f"run_dir={run_dir}", "data_dir=/nonexistent", "device=cpu",
            "wandb.mode=disabled", "sae.n_features=64", "sae.batch_size=64", "sae.steps=12", "sae.lr=3e-3",
            "sae.lr_warmup_steps=4"]


def read_frontier(out: Path, stem: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], str]:
    """The JSON, its rows by architecture and the Markdown table of `<out>/<stem>`, after checking that
    there are four rows (one per kind), each with a finite L0 > 0, FVU and dead fraction and a training
    time, Matryoshka with its three prefix FVUs."""
    got = json.loads((out / f"{stem}.json").read_text())
    rows = {r["arch"]: r for r in got["results"]}
    assert len(got["results"]) == 4 and len(rows) == 4
    for r in got["results"]:
        assert all(math.isfinite(r[k]) for k in ("l0", "fvu", "dead_fraction")), r
        assert r["l0"] > 0 and r["train_s"] > 0
    assert list(rows["matryoshka"]["prefix_fvu"]) == ["4", "16", "64"]
    return got, rows, (out / f"{stem}.md").read_text()
