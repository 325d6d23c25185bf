"""Train and tabulate the neuron-resampling study of `conf/preset/resample_study.yaml`.

    python -m tools.resample_study run_dir=runs/demo data_dir=data [--jobs 2] [--table-only]

Every combination of `study.grid` (lr x l1_coeff x resampling on/off) and every `study.extra` run
is one `autoencoder.train preset=resample_study sae.name=study-<row>` process (finished rows are
skipped by the stage itself); then a Markdown table of the held-out figures at the end of training
and of each resampling event (resampled / revived, alive before / still firing) is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.core.config import UserError, compose, section
from tools.core.layout import RunLayout


@dataclass
class StudyGrid:
    lr: list[float] = field(default_factory=list)  # sae.lr values
    l1_coeff: list[float] = field(default_factory=list)  # sae.l1_coeff values
    resample: list[bool] = field(default_factory=list)  # false: sae.resample_steps=[]


@dataclass
class StudyConfig:
    """The `study` section of conf/preset/resample_study.yaml."""

    grid: StudyGrid = field(default_factory=StudyGrid)  # every combination is one row
    extra: dict[str, list[str]] = field(default_factory=dict)  # row name -> `sae.` overrides (no prefix)

    def check(self) -> StudyConfig:
        if not (self.grid.lr and self.grid.l1_coeff and self.grid.resample):
            raise UserError("config `study.grid`: lr, l1_coeff and resample each need at least one value "
                            "(preset=resample_study sets them)")
        return self


def study_rows(study: StudyConfig) -> list[tuple[str, list[str]]]:
    """(row name, sae overrides): the collapse setting (largest lr and λ) first, then the
    isolating extras, then the rest of the grid."""
    g = study.grid
    grid = []
    for lr, lam, rs in itertools.product(g.lr, g.l1_coeff, g.resample):
        name = f"lr{lr:g}-l1c{lam:g}-{'resample' if rs else 'none'}"
        grid.append(((lr, lam), name, [f"sae.lr={lr}", f"sae.l1_coeff={lam}"]
                     + ([] if rs else ["sae.resample_steps=[]"])))
    top = max(k for k, _, _ in grid)
    first = [(n, o) for k, n, o in grid if k == top]
    rest = [(n, o) for k, n, o in grid if k != top]
    extra = []
    for name, ov in study.extra.items():  # a key given in the row replaces the grid's value
        keys = {o.partition("=")[0] for o in ov}
        base = [o for o in (f"lr={top[0]}", f"l1_coeff={top[1]}") if o.partition("=")[0] not in keys]
        extra.append((name, [f"sae.{o}" for o in (*base, *ov)]))
    return first + extra + rest


def train_row(name: str, overrides: list[str], base: list[str], run_dir: Path) -> int:
    log = RunLayout(run_dir).logs("resample_study", f"{name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "autoencoder.train", "preset=resample_study", *base,
           f"sae.name=study-{name}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    print(f"{name}: exit {rc} ({log})", flush=True)
    return rc


def fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[tuple[str, list[str]]], run_dir: Path) -> str:
    """Markdown: one line per row with final dead fraction, L0, EV, loss recovered and events."""
    head = ("| run | overrides | dead | L0 | EV | loss rec. | resampling events: step resampled→revived, "
            "alive before→still firing |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for name, ov in rows:
        path = RunLayout(run_dir).sae(f"study-{name}") / "cfg.json"
        shown = " ".join(o.removeprefix("sae.") for o in ov)
        if not path.is_file():
            lines.append(f"| {name} | {shown} | not run | | | | |")
            continue
        meta = json.loads(path.read_text())
        m = meta.get("metrics", {})
        ev = "; ".join(f"{e['step']}: {e['count']}→{e.get('revived', '?')}, "
                       f"{e['alive_before']}→{e.get('survived', '?')}"
                       + (f" (new fire on {e['new_density']:.0%}, add {e['new_recon_ratio']:.2f}×‖x̄‖)"
                          if e.get("count") and "new_density" in e else "")
                       for e in meta["training"].get("resampled", []))
        lines.append(f"| {name} | {shown} | "
                     f"{fmt(m.get('sparsity/dead_fraction'), '.1%')} | {fmt(m.get('metrics/l0'), '.1f')} | "
                     f"{fmt(m.get('metrics/explained_variance'), '.3f')} | "
                     f"{fmt(m.get('metrics/loss_recovered'), '.3f')} | {ev or '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (run_dir=..., data_dir=...)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--table-only", action="store_true", help="only print the table of finished runs")
    ap.add_argument("--only", nargs="*", default=None, help="row names to train")
    args = ap.parse_args()
    cfg = compose(["preset=resample_study", *args.overrides])
    run_dir = Path(str(cfg.run_dir))
    rows = study_rows(section(cfg, "study", StudyConfig))
    if not args.table_only:
        todo = [r for r in rows if args.only is None or r[0] in args.only]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda r: train_row(r[0], r[1], args.overrides, run_dir), todo))
    print(table(rows, run_dir))


if __name__ == "__main__":
    main()
