"""SAELens's own trainers on our shards, scored by our evaluator: the other side of the frontier.

    PYTHONPATH=. python -m tools.bench.saelens_frontier run_dir=runs/demo data_dir=data [--archs topk]
    python -m tools.bench.saelens_frontier ... --archs jumprelu --set jumprelu_ste_to_input=True
    python -m tools.bench.saelens_frontier run_dir=runs/demo data_dir=data --eval-all

Needs sae-lens (`pip install -e .[compat]`). Trains SAELens's TopK, BatchTopK, Matryoshka BatchTopK and
JumpReLU with its `SAETrainer` on `<run_dir>/activations/train` in our trainer's row order (`ShardReader`,
seed `seed`), with the frontier's budget (`tools.bench.frontier.DEMO_BUDGET`; Hydra overrides after the
options apply) and SAELens's defaults otherwise: decoder rows at norm 0.1, W_enc = W_decᵀ, b_dec 0;
AuxK weight 1 on latents silent for 1,000 steps; TopK on decoder-norm-rescaled pre-activations;
BatchTopK's threshold EMA; JumpReLU's θ₀ 0.01, bandwidth 0.05, "step" L0 loss with gradient to θ only,
`l0_coefficient` 1 on its raw loss (MSE summed over d_in); gradient clipping at 1; Matryoshka with our
prefix widths (n/16, n/4, n). `--set FIELD=VALUE` changes a SAELens config field. On the demo shards
JumpReLU's defaults end at L0 ~140 whatever the coefficient (Adam moves θ about lr a step: 0.01 -> ~0.4
in 1,500 steps); `jumprelu_ste_to_input=True` (Anthropic's estimator) or `jumprelu_init_threshold=0.2`
reach L0 16-32.

Each SAE is saved by SAELens's `save_inference_model` (BatchTopK and Matryoshka as JumpReLU at the
learned threshold) in `<run_dir>/saelens/<arch>-<setting>/` with `training.json` (trainer settings, wall
time); a folder already there is reused. Each is opened as this project opens any SAELens folder
(`autoencoder.dictionaries.load_dictionary`) and scored by one `Evaluator` as `tools.bench.frontier`
scores ours: L0, FVU, dead fraction on the same held-out val rows, loss recovered on the same val
contexts, Matryoshka's prefix FVU. Writes `frontier-saelens.md` and `.json` to `--out` (default
`<run_dir>/frontier`) and one `key=value` line per SAE to stdout.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tools.bench.frontier import DEMO_BUDGET, print_results, result_row, split_preset, table
from tools.core.config import UserError

CLASSES = {"topk": "TopKTrainingSAE", "batchtopk": "BatchTopKTrainingSAE",
           "matryoshka": "MatryoshkaBatchTopKTrainingSAE", "jumprelu": "JumpReLUTrainingSAE"}
ARCHS = tuple(CLASSES)
TRAINING_FILE = "training.json"  # ours, beside SAELens's files: trainer settings, wall time
MISSING = "sae-lens is not installed: pip install -e .[compat] (sae-lens>=6.54,<7)"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/frontier)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--ks", default="16,32,64", help="k of topk, batchtopk, matryoshka")
    p.add_argument("--l0-coeffs", default="1.0", help="SAELens l0_coefficient values of jumprelu")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a SAELens config "
                   "field for every SAE of this call (repeatable; in the setting and folder name)")
    p.add_argument("--eval-rows", type=int, default=8192)
    p.add_argument("--eval-contexts", type=int, default=32)
    p.add_argument("--no-budget", action="store_true", help="do not apply the demo budget overrides")
    p.add_argument("--eval-all", action="store_true",
                   help="train none; evaluate every SAE this tool trained under <run_dir>/saelens/")
    a, overrides = p.parse_known_args(argv)
    a.archs = [s for s in a.archs.split(",") if s]
    bad = [s for s in a.archs if s not in ARCHS]
    if bad:
        p.error(f"--archs takes {','.join(ARCHS)}, not {bad}")
    a.ks = [int(s) for s in a.ks.split(",") if s]
    a.l0_coeffs = [s for s in a.l0_coeffs.split(",") if s]
    return a, overrides


def runs(a: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(architecture, setting, folder name) for every SAE."""
    extra = "".join(f", {kv}" for kv in a.set)
    suffix = "".join(f"-{kv.replace('=', '')}" for kv in a.set)
    out = []
    for arch in a.archs:
        if arch == "jumprelu":
            out += [(arch, f"l0_coefficient={v}{extra}", f"{arch}-l0c{v}{suffix}") for v in a.l0_coeffs]
        else:
            out += [(arch, f"k={k}{extra}", f"{arch}-k{k}{suffix}") for k in a.ks]
    return out


def trained(root: Path) -> list[tuple[str, str, str]]:
    """(architecture, setting, folder name) of every SAE this tool saved under `root`, by architecture,
    then family (the --set fields), then name."""
    from tools.core.files import read_json

    found = [(read_json(p), p.parent.name) for p in root.glob(f"*/{TRAINING_FILE}")]
    return sorted(((t["arch"], t["setting"], n) for t, n in found),
                  key=lambda r: (ARCHS.index(r[0]), r[1].partition(", ")[2], r[2]))


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def sae_lens_module() -> Any:
    """sae_lens, or exit with one line naming the extra."""
    try:
        import sae_lens
    except ImportError:
        print(MISSING, file=sys.stderr)
        sys.exit(2)
    return sae_lens


def training_sae(arch: str, setting: str, d_in: int, c: Any, hook: str, device: str) -> Any:
    """A fresh SAELens training SAE: its defaults, but for the width, the fields of `setting`
    ("k=16, field=value, ...") and, for Matryoshka, our prefix widths."""
    sl = sae_lens_module()
    from sae_lens.saes.sae import SAEMetadata

    fields: dict[str, Any] = {"matryoshka_widths": c.widths()} if arch == "matryoshka" else {}
    for kv in setting.split(", "):
        key, value = kv.split("=", 1)
        try:
            fields[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[key] = value
    name = CLASSES[arch]
    try:
        cfg = getattr(sl, name + "Config")(d_in=d_in, d_sae=c.n_features, device=device,
                                             metadata=SAEMetadata(hook_name=hook), **fields)
    except TypeError as e:
        raise UserError(f"SAELens {name}Config: {e}") from e
    return getattr(sl, name)(cfg)


def train_one(arch: str, setting: str, folder: Path, cfg: Any, c: Any, train_dir: Path) -> None:
    """Train one SAE with SAELens's SAETrainer on our train shards; save it in SAELens's format, and
    the trainer's settings and wall time in `training.json` beside it."""
    from autoencoder.shard_reader import ShardReader
    from tools.core.config import resolve_device
    from tools.core.files import read_json, write_json

    sl = sae_lens_module()
    from sae_lens.config import SAETrainerConfig

    device = resolve_device(str(cfg.device))
    manifest = read_json(train_dir / "manifest.json", "shard manifest")
    torch.manual_seed(int(cfg.seed))
    sae = training_sae(arch, setting, int(manifest["d_in"]), c, str(manifest["hook_name"]), device)
    # lr_end: what SAELens's runner config sets (lr / 10); its constant schedule ignores it
    tcfg = SAETrainerConfig(total_training_samples=c.steps * c.batch_size,
                            train_batch_size_samples=c.batch_size, lr=c.lr, lr_end=c.lr / 10,
                            lr_warm_up_steps=c.lr_warmup_steps, device=device)
    reader = ShardReader(train_dir, c.batch_size, seed=int(cfg.seed), device=device)
    t0 = time.perf_counter()
    try:
        sl.SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(reader)).fit()
    finally:
        reader.close()
    wall = time.perf_counter() - t0
    sae.save_inference_model(str(folder))
    trainer = {k: v for k, v in dataclasses.asdict(tcfg).items() if k != "logger"}
    write_json(folder / TRAINING_FILE, {"arch": arch, "setting": setting, "sae_lens_version": sl.__version__,
                                        "wall_s": wall, "seed": int(cfg.seed), "trainer": trainer})
    log(f"saelens {folder.name}: {c.steps} steps in {wall:.0f} s -> {folder}")


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


def evaluate(cfg: Any, c: Any, names: list[tuple[str, str, str]], root: Path, hook: str,
             d_in: int) -> list[dict[str, Any]]:
    """One Evaluator for every SAELens folder: the held-out rows and val contexts of ours."""
    from autoencoder.dictionaries import load_dictionary
    from autoencoder.evaluator import Evaluator
    from tools.core.config import resolve_device
    from tools.core.files import read_json

    device = resolve_device(str(cfg.device))
    evaluator, results = None, []
    for arch, setting, name in names:
        folder = root / name
        if not (folder / "sae_weights.safetensors").is_file():
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


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException

    from autoencoder.config import SAETrainConfig
    from tools.core.config import compose, error_line, section
    from tools.core.files import atomic_path, read_json, write_json
    from tools.core.layout import RunLayout

    a, overrides = parse_args(argv)
    names = runs(a)
    sl = sae_lens_module()
    preset, rest = split_preset(overrides)
    base = [*preset, *([] if a.no_budget else DEMO_BUDGET), *rest]
    try:
        cfg = compose(base)
        c = section(cfg, "sae", SAETrainConfig)
        c.eval_rows, c.eval_contexts = a.eval_rows, a.eval_contexts
        run_dir = Path(str(cfg.run_dir))
        train_dir = RunLayout(run_dir).activations("train", cfg.sae.get("hook"))
        manifest = read_json(train_dir / "manifest.json", "shard manifest")
        root = run_dir / "saelens"
        names = trained(root) if a.eval_all else names
        for arch, setting, name in ([] if a.eval_all else names):
            if (root / name / "sae_weights.safetensors").is_file():
                log(f"note: {root / name} exists: reused")
                continue
            log(f"# training SAELens {arch} ({setting})")
            train_one(arch, setting, root / name, cfg, c, train_dir)
        results = evaluate(cfg, c, names, root, str(manifest["hook_name"]), int(manifest["d_in"]))
    except (UserError, HydraException) as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)
    out = Path(a.out) if a.out else run_dir / "frontier"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "frontier-saelens.md") as tmp:
        tmp.write_text(table(results), encoding="utf-8")
    write_json(out / "frontier-saelens.json", {
        "sae_lens_version": sl.__version__, "overrides": base, "budget": [] if a.no_budget else DEMO_BUDGET,
        "matryoshka_widths": c.widths(), "results": results})
    print_results(results)
    print(f"table={out / 'frontier-saelens.md'}", flush=True)


if __name__ == "__main__":
    main()
