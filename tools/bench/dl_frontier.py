"""dictionary_learning's own trainers on our shards, scored by our evaluator: another side of the frontier.

    PYTHONPATH=. python -m tools.bench.dl_frontier run_dir=runs/demo data_dir=data [--archs topk]
    python -m tools.bench.dl_frontier run_dir=runs/demo data_dir=data --eval-all

Needs dictionary-learning 0.1.0 (`pip install --no-deps dictionary-learning==0.1.0`). Its package
`__init__` imports nnsight (through its activation buffer), and `trainers/__init__` imports every trainer,
but the modules used here (`dictionary.py`, `trainers/{trainer,top_k,batch_top_k,
matryoshka_batch_top_k,jumprelu}.py`) need only torch and einops. So `trainer_class` registers empty
package modules for `dictionary_learning` and `dictionary_learning.trainers` in `sys.modules`, with the
real `__path__`, and imports `dictionary_learning.trainers.top_k` etc. without running either `__init__`
(an already imported package is used as it is).

Trains `TopKTrainer`, `BatchTopKTrainer`, `MatryoshkaBatchTopKTrainer` and `JumpReluTrainer` by calling
each trainer's `update(step, x)` on `<run_dir>/activations/train` in our trainer's row order
(`ShardReader`, seed `seed`, float32 rows), as the loop of their `trainSAE` does without its logging and
checkpoints (and with `normalize_activations` off, its default). Width, steps, batch, lr and lr warmup
come from the composed config (the frontier's `DEMO_BUDGET`: 2,048 latents, 1,500 steps x 512 rows, lr
3e-4, warmup 100; Hydra overrides after the options apply), passed explicitly; the rest is
dictionary_learning's defaults: unit-norm decoder columns (gradient parallel to them removed, renormed
each step), W_enc = W_decᵀ, b_dec the geometric median of the first batch, Adam (0.9, 0.999), gradient
clipping at 1, no lr decay (`decay_start` None); AuxK weight 1/32 on latents silent for 10M tokens (more
than the budget's 768k rows, so AuxK never fires here); BatchTopK's and Matryoshka's inference threshold
the EMA (β 0.999, from step 1,000) of each batch's smallest kept activation; Matryoshka with our prefix
widths (n/16, n/4, n) as its group fractions (1/16, 3/16, 3/4) and its equal group weights. JumpReLU
(`--ks` are its `target_l0`): threshold and bandwidth 0.001, L0 penalty (L0/target − 1)², Adam (0, 0.999);
its sparsity warmup of 2,000 steps must be below the steps (their assert), so it is twice the lr warmup
(their 2,000 : 1,000). `--set FIELD=VALUE` passes a trainer argument to every SAE of the call.

Each SAE is saved as `trainSAE` saves one, `ae.pt` (the state dict, CPU tensors, `torch.save`) and
`config.json` (`{"trainer": trainer.config}`), in `<run_dir>/dictionary_learning/<arch>-k<k>/`, with our
`training.json` (trainer settings, wall time) beside it; a folder with `ae.pt` is reused. Each is opened
by `autoencoder.dictionaries.load_dictionary` and scored as `saelens_frontier` scores SAELens's
(`tools.bench.library_frontier`). Writes `frontier-dictionary-learning.md` and `.json` to `--out`
(default `<run_dir>/frontier`) and one `key=value` line per SAE to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from tools.bench import library_frontier as lf
from tools.core.config import UserError

PACKAGE = "dictionary_learning"
TRAINERS = {"topk": ("top_k", "TopKTrainer"), "batchtopk": ("batch_top_k", "BatchTopKTrainer"),
            "matryoshka": ("matryoshka_batch_top_k", "MatryoshkaBatchTopKTrainer"),
            "jumprelu": ("jumprelu", "JumpReluTrainer")}
ARCHS = tuple(TRAINERS)
WEIGHTS_FILE, CONFIG_FILE = "ae.pt", "config.json"  # as dictionary_learning.training.trainSAE writes
MISSING = "dictionary_learning is not importable: pip install --no-deps dictionary-learning==0.1.0 einops"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = lf.parser(__doc__, ARCHS, PACKAGE, "k of topk, batchtopk, matryoshka; target_l0 of jumprelu",
                  "a dictionary_learning trainer argument")
    return lf.parse(p, ARCHS, argv)


def runs(a: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(architecture, setting, folder name) for every SAE."""
    return lf.runs(a, lambda arch: ("target_l0" if arch == "jumprelu" else "k", "k", a.ks))


def _packages() -> None:
    """Empty modules for dictionary_learning and its trainers package (see the module docstring)."""
    if sys.modules.get(PACKAGE) is None:
        spec = importlib.util.find_spec(PACKAGE)  # None where sys.modules holds None (blocked)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"no module named {PACKAGE!r}")
        stub = types.ModuleType(PACKAGE)
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules[PACKAGE] = stub
    trainers = f"{PACKAGE}.trainers"
    if trainers not in sys.modules:
        stub = types.ModuleType(trainers)
        stub.__path__ = [str(Path(p) / "trainers") for p in sys.modules[PACKAGE].__path__]
        sys.modules[trainers] = stub


def trainer_class(arch: str) -> type:
    """dictionary_learning's trainer class of `arch`, or exit 2 with one line."""
    module, name = TRAINERS[arch]
    try:
        _packages()
        return getattr(importlib.import_module(f"{PACKAGE}.trainers.{module}"), name)
    except (ImportError, AttributeError) as e:
        print(f"{MISSING} ({str(e).splitlines()[0] if str(e) else type(e).__name__})", file=sys.stderr)
        sys.exit(2)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("dictionary-learning")
    except PackageNotFoundError:
        return "unknown"


def group_sizes(widths: list[int]) -> list[int]:
    """Our Matryoshka prefix widths as dictionary_learning's group sizes."""
    return [w - v for v, w in zip([0, *widths[:-1]], widths, strict=True)]


def group_fractions(widths: list[int]) -> list[float]:
    """Our Matryoshka prefix widths as dictionary_learning's group fractions of the whole width."""
    return [s / widths[-1] for s in group_sizes(widths)]


def trainer_args(arch: str, setting: str, c: Any, manifest: dict[str, Any], seed: int,
                 device: str) -> dict[str, Any]:
    """The arguments of one trainer: our budget and metadata, the fields of `setting`, theirs otherwise."""
    from transformer.subject import parse_hook

    hook = str(manifest["hook_name"])
    layer = manifest.get("layer")
    if not isinstance(layer, int):  # manifests of autoencoder.shard_write alone may lack it
        try:
            layer = parse_hook(hook)[0]
        except UserError:
            layer = -1
    kw: dict[str, Any] = {
        "steps": c.steps, "activation_dim": int(manifest["d_in"]), "dict_size": c.n_features, "layer": layer,
        "lm_name": str((manifest.get("model") or {}).get("name") or "unknown"), "submodule_name": hook,
        "lr": c.lr, "warmup_steps": c.lr_warmup_steps, "seed": seed, "device": device}
    if arch == "matryoshka":
        kw["group_fractions"] = group_fractions(c.widths())
    if arch == "jumprelu":  # their 2,000 is not below our 1,500 steps; keep their ratio to the lr warmup
        kw["sparsity_warmup_steps"] = 2 * c.lr_warmup_steps
    kw.update(lf.fields(setting))
    return kw


def train_one(arch: str, setting: str, folder: Path, cfg: Any, c: Any, train_dir: Path,
              manifest: dict[str, Any]) -> None:
    """Train one dictionary with dictionary_learning's trainer on our train shards (`manifest`: theirs);
    save it as their `trainSAE` does, and the trainer's settings and wall time in `training.json`
    beside it."""
    from autoencoder.shard_reader import ShardReader
    from tools.core.config import resolve_device
    from tools.core.files import atomic_path, write_json

    cls = trainer_class(arch)
    device = resolve_device(str(cfg.device))
    seed = int(cfg.seed)
    torch.manual_seed(seed)  # JumpReluTrainer takes a seed but does not set it
    kw = trainer_args(arch, setting, c, manifest, seed, device)
    try:
        trainer = cls(**kw)
    except (TypeError, AssertionError) as e:
        raise UserError(f"dictionary_learning {cls.__name__}({setting}): {e or 'assertion failed'}") from e
    if arch == "matryoshka" and list(trainer.group_sizes) != group_sizes(c.widths()):
        raise UserError(f"Matryoshka widths {c.widths()} are not its group sizes {trainer.group_sizes}")
    reader = ShardReader(train_dir, c.batch_size, seed=seed, device=device)
    loss, t0 = float("nan"), time.perf_counter()
    try:
        for step, x in zip(range(c.steps), reader, strict=False):
            loss = trainer.update(step, x.float())
    finally:
        reader.close()
    wall = time.perf_counter() - t0
    config = {"trainer": trainer.config}
    write_json(folder / CONFIG_FILE, config)
    write_json(folder / lf.TRAINING_FILE, {
        "arch": arch, "setting": setting, "dictionary_learning_version": version(), "wall_s": wall,
        "seed": seed, "final_loss": loss, "arguments": kw, "trainer": config["trainer"]})
    with atomic_path(folder / WEIGHTS_FILE) as tmp:  # last: a folder with ae.pt is finished
        torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, tmp)
    lf.log(f"dictionary_learning {folder.name}: {c.steps} steps in {wall:.0f} s -> {folder}")


def main(argv: list[str] | None = None) -> None:
    a, overrides = parse_args(argv)
    for arch in a.archs:
        trainer_class(arch)  # a missing or broken install is one line before anything is composed
    lf.main(a, overrides, runs(a), lf.Library("dictionary_learning", ARCHS, PACKAGE,
                                              "frontier-dictionary-learning", WEIGHTS_FILE, train_one,
                                              {"dictionary_learning_version": version()}))


if __name__ == "__main__":
    main()
