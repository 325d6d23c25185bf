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
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tools.bench import library_frontier as lf
from tools.core.config import UserError

CLASSES = {"topk": "TopKTrainingSAE", "batchtopk": "BatchTopKTrainingSAE",
           "matryoshka": "MatryoshkaBatchTopKTrainingSAE", "jumprelu": "JumpReLUTrainingSAE"}
ARCHS = tuple(CLASSES)
TRAINING_FILE = lf.TRAINING_FILE
MISSING = "sae-lens is not installed: pip install -e .[compat] (sae-lens>=6.54,<7)"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = lf.parser(__doc__, ARCHS, "saelens", "k of topk, batchtopk, matryoshka", "a SAELens config field")
    p.add_argument("--l0-coeffs", default="1.0", help="SAELens l0_coefficient values of jumprelu")
    a, overrides = lf.parse(p, ARCHS, argv)
    a.l0_coeffs = [s for s in a.l0_coeffs.split(",") if s]
    return a, overrides


def runs(a: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(architecture, setting, folder name) for every SAE."""
    return lf.runs(a, lambda arch: ("l0_coefficient", "l0c", a.l0_coeffs) if arch == "jumprelu"
                   else ("k", "k", a.ks))


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
    fields.update(lf.fields(setting))
    name = CLASSES[arch]
    try:
        cfg = getattr(sl, name + "Config")(d_in=d_in, d_sae=c.n_features, device=device,
                                             metadata=SAEMetadata(hook_name=hook), **fields)
    except TypeError as e:
        raise UserError(f"SAELens {name}Config: {e}") from e
    return getattr(sl, name)(cfg)


def train_one(arch: str, setting: str, folder: Path, cfg: Any, c: Any, train_dir: Path,
              manifest: dict[str, Any]) -> None:
    """Train one SAE with SAELens's SAETrainer on our train shards (`manifest`: theirs); save it in
    SAELens's format, and the trainer's settings and wall time in `training.json` beside it."""
    from autoencoder.shard_reader import ShardReader
    from tools.core.config import resolve_device
    from tools.core.files import write_json

    sl = sae_lens_module()
    from sae_lens.config import SAETrainerConfig

    device = resolve_device(str(cfg.device))
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
    lf.log(f"saelens {folder.name}: {c.steps} steps in {wall:.0f} s -> {folder}")


def main(argv: list[str] | None = None) -> None:
    a, overrides = parse_args(argv)
    sl = sae_lens_module()
    lf.main(a, overrides, runs(a), lf.Library("SAELens", ARCHS, "saelens", "frontier-saelens",
                                              "sae_weights.safetensors", train_one,
                                              {"sae_lens_version": sl.__version__}))


if __name__ == "__main__":
    main()
