"""What the frontiers of other libraries' trainers share (`saelens_frontier`, `dl_frontier`).

The options, the SAE list and its folder names, the train-or-reuse loop on the composed budget
(`tools.bench.frontier.DEMO_BUDGET` unless `--no-budget`; Hydra overrides after the options apply),
scoring every saved folder, opened by `autoencoder.dictionaries.load_dictionary`, with one `Evaluator` as
`tools.bench.frontier` scores ours (L0, FVU, dead fraction on the same held-out val rows, loss recovered
on the same val contexts, Matryoshka's prefix FVU), and the table files (`<stem>.md`, `<stem>.json`).
A library module supplies a `Library`: where its SAEs live, the file that marks one finished, and how to
train one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tools.bench.frontier import DEMO_BUDGET, print_results, result_row, split_preset, table
from tools.core.config import UserError

TRAINING_FILE = "training.json"  # ours, beside the library's files: trainer settings, wall time


@dataclasses.dataclass
class Library:
    name: str  # in log lines
    archs: tuple[str, ...]  # the table's order
    subdir: str  # SAEs in <run_dir>/<subdir>/<folder name>/
    stem: str  # <out>/<stem>.md and .json
    weights_file: str  # present once an SAE is saved
    train_one: Callable[..., None]  # (arch, setting, folder, cfg, c, train_dir, train_dir's manifest)
    info: dict[str, Any]  # first keys of the JSON (the library's version)


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def parser(doc: str, archs: tuple[str, ...], subdir: str, ks_help: str,
           set_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/frontier)")
    p.add_argument("--archs", default=",".join(archs))
    p.add_argument("--ks", default="16,32,64", help=ks_help)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"{set_help} for every SAE of this call (repeatable; in the setting and folder name)")
    p.add_argument("--eval-rows", type=int, default=8192)
    p.add_argument("--eval-contexts", type=int, default=32)
    p.add_argument("--no-budget", action="store_true", help="do not apply the demo budget overrides")
    p.add_argument("--eval-all", action="store_true",
                   help=f"train none; evaluate every SAE this tool trained under <run_dir>/{subdir}/")
    return p


def parse(p: argparse.ArgumentParser, archs: tuple[str, ...],
          argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(options, the Hydra overrides left over); an unknown architecture exits 2."""
    a, overrides = p.parse_known_args(argv)
    a.archs = [s for s in a.archs.split(",") if s]
    bad = [s for s in a.archs if s not in archs]
    if bad:
        p.error(f"--archs takes {','.join(archs)}, not {bad}")
    a.ks = [int(s) for s in a.ks.split(",") if s]
    return a, overrides


def runs(a: argparse.Namespace,
         knob: Callable[[str], tuple[str, str, list[Any]]]) -> list[tuple[str, str, str]]:
    """(architecture, setting, folder name) for every SAE; `knob(arch)` is (field, folder tag, values)."""
    extra = "".join(f", {kv}" for kv in a.set)
    suffix = "".join(f"-{kv.replace('=', '')}" for kv in a.set)
    out = []
    for arch in a.archs:
        field, tag, values = knob(arch)
        out += [(arch, f"{field}={v}{extra}", f"{arch}-{tag}{v}{suffix}") for v in values]
    return out


def fields(setting: str) -> dict[str, Any]:
    """The fields of a setting ("k=16, field=value, ..."), each value a Python literal where it parses."""
    out: dict[str, Any] = {}
    for kv in setting.split(", "):
        key, value = kv.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def trained(root: Path, archs: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(architecture, setting, folder name) of every SAE saved under `root`, by architecture, then
    family (the --set fields), then name."""
    from tools.core.files import read_json

    found = [(read_json(p), p.parent.name) for p in root.glob(f"*/{TRAINING_FILE}")]
    return sorted(((t["arch"], t["setting"], n) for t, n in found),
                  key=lambda r: (archs.index(r[0]), r[1].partition(", ")[2], r[2]))


class Scored(torch.nn.Module):
    """A loaded `Dictionary` (no skip path) under the names our `Evaluator` reads of an SAE."""

    def __init__(self, d: Any):
        super().__init__()
        self.d, self.cfg = d, SimpleNamespace(d_sae=d.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.d.encode(x)

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return self.d.decode(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(x)


@torch.no_grad()
def prefix_fvu(d: Any, rows: torch.Tensor, widths: list[int]) -> dict[int, float]:
    """Matryoshka: FVU of the reconstruction from each prefix of the latents alone."""
    from autoencoder.metrics import explained_variance

    f = d.encode(rows)
    index = torch.arange(f.shape[1], device=f.device)
    return {w: 1.0 - explained_variance(rows, d.decode(f * (index < w).to(f))) for w in widths}


def evaluate(cfg: Any, c: Any, names: list[tuple[str, str, str]], root: Path, hook: str, d_in: int,
             weights_file: str) -> list[dict[str, Any]]:
    """One Evaluator for every saved folder: the held-out rows and val contexts of ours."""
    from autoencoder.dictionaries import load_dictionary
    from autoencoder.evaluator import Evaluator
    from tools.core.config import resolve_device
    from tools.core.files import read_json

    device = resolve_device(str(cfg.device))
    evaluator, results = None, []
    for arch, setting, name in names:
        folder = root / name
        if not (folder / weights_file).is_file():
            log(f"note: {folder} not trained: skipped")
            continue
        d = load_dictionary(folder, hook=hook, device=device)
        if evaluator is None:
            evaluator = Evaluator(cfg, c, Path(str(cfg.run_dir)), d_in, hook, device, log)
        m, _ = evaluator(Scored(d))
        row = result_row(arch, setting, name, m)
        if (folder / TRAINING_FILE).is_file():
            row["train_s"] = read_json(folder / TRAINING_FILE).get("wall_s")
        if arch == "matryoshka" and evaluator.rows is not None:
            row["prefix_fvu"] = prefix_fvu(d, evaluator.rows.to(device), c.widths())
        results.append(row)
    return results


def main(a: argparse.Namespace, overrides: list[str], names: list[tuple[str, str, str]],
         lib: Library) -> None:
    """Compose the config, train each SAE of `names` not saved yet (or, with --eval-all, take every saved
    one), score them all, write the table files and print one key=value line per SAE."""
    from hydra.errors import HydraException

    from autoencoder.config import SAETrainConfig
    from tools.core.config import compose, error_line, section
    from tools.core.files import atomic_path, read_json, write_json
    from tools.core.layout import RunLayout

    preset, rest = split_preset(overrides)
    base = [*preset, *([] if a.no_budget else DEMO_BUDGET), *rest]
    try:
        cfg = compose(base)
        c = section(cfg, "sae", SAETrainConfig)
        c.eval_rows, c.eval_contexts = a.eval_rows, a.eval_contexts
        run_dir = Path(str(cfg.run_dir))
        train_dir = RunLayout(run_dir).activations("train", cfg.sae.get("hook"))
        manifest = read_json(train_dir / "manifest.json", "shard manifest")
        root = run_dir / lib.subdir
        names = trained(root, lib.archs) if a.eval_all else names
        for arch, setting, name in ([] if a.eval_all else names):
            if (root / name / lib.weights_file).is_file():
                log(f"note: {root / name} exists: reused")
                continue
            log(f"# training {lib.name} {arch} ({setting})")
            lib.train_one(arch, setting, root / name, cfg, c, train_dir, manifest)
        results = evaluate(cfg, c, names, root, str(manifest["hook_name"]), int(manifest["d_in"]),
                           lib.weights_file)
    except (UserError, HydraException) as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)
    out = Path(a.out) if a.out else run_dir / "frontier"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / f"{lib.stem}.md") as tmp:
        tmp.write_text(table(results), encoding="utf-8")
    write_json(out / f"{lib.stem}.json", {
        **lib.info, "overrides": base, "budget": [] if a.no_budget else DEMO_BUDGET,
        "matryoshka_widths": c.widths(), "results": results})
    print_results(results)
    print(f"table={out / f'{lib.stem}.md'}", flush=True)
