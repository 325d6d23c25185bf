"""Train a sparse autoencoder on activation shards: `python -m autoencoder.train run_dir=...`.

Reads `run_dir/activations/train` (+ `resample.npy`), evaluates on `run_dir/activations/val` and
on held-out val token contexts (`data_dir/<data.name>/val.bin` through the model in
`run_dir/transformer`), and writes `run_dir/sae/<name>/` (`sae_weights.safetensors`, `cfg.json`,
`sparsity.safetensors`, `density_histogram.png`, `checkpoint/`).

This module is the stage: the `sae` config section, the SAE's folder name, `done` and `run`.
The run itself is `autoencoder.trainer.Trainer` (step, resample, evaluate, checkpoint, finish);
it runs under `torchrun` and resumes exactly from `checkpoint/`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from autoencoder.config import SAETrainConfig
from autoencoder.evaluator import summary
from autoencoder.saes import arch_class
from autoencoder.saes.base import short_float
from autoencoder.trainer import RunSpec, Trainer
from tools.core import guard
from tools.core.config import UserError, output_fields, resolve_device, section, stage_main
from tools.core.distributed import Dist
from tools.core.files import config_hash, read_json
from tools.core.layout import RunLayout
from tools.core.stage import Stage


def math_config(c: SAETrainConfig, d_in: int, world_size: int) -> dict[str, Any]:
    """The keys a checkpoint must share with the run that resumes it."""
    d = output_fields(c)
    return {**d, "d_in": d_in, "world_size": world_size}


def sae_name(c: SAETrainConfig, sweep_overrides: list[str] | None = None) -> str:
    """`l1-4096-l1c1e-3` / `topk-4096-k32` / `jumprelu-4096-l0c1e-3` (`tc-` in front for a
    transcoder), plus any other `sae.` key swept in a Hydra multirun (e.g. `-lr3e-4`), so the runs
    of a sweep never share a folder."""
    if c.name:
        return c.name
    tag, keys = arch_class(c.architecture).name_tag(c)
    base = ("tc-" if c.kind == "transcoder" else "") + f"{c.architecture}-{c.n_features}-{tag}"
    implied = {"architecture", "n_features", "name", "kind", *keys}
    for ov in sweep_overrides or []:
        key, _, _ = ov.lstrip("+~").partition("=")
        if key.startswith("sae.") and key[4:] not in implied:
            val = getattr(c, key[4:], None)
            if isinstance(val, float):
                tag = short_float(val)
            elif isinstance(val, (list, tuple)):  # e.g. resample_steps: how many, not which
                tag = str(len(val))
            else:
                tag = str(val).replace("/", "_").replace(" ", "")
            base += f"-{key[4:].replace('_', '')}{tag}"
    return base


def _multirun_overrides() -> list[str] | None:
    """The swept `sae.` overrides of this job when inside a Hydra multirun, else None.

    Hydra keeps every override of a job in `overrides.task`, swept or fixed; the swept keys are
    the ones whose command-line value is a sweep (`a,b`, `range(...)`, `choice(...)`).
    """
    import re
    import sys

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        task = list(hc.overrides.task)
    except Exception:  # noqa: BLE001 - not under Hydra (tests, pipeline): no sweep suffix
        return None
    swept = set()
    for arg in sys.argv[1:]:
        key, eq, val = arg.partition("=")
        flat = re.sub(r"\[[^\]]*\]", "", val)  # a list value's commas do not make a sweep
        if eq and ("," in flat or re.match(r"(range|choice|interval|glob)\(", val)):
            swept.add(key.lstrip("+~"))
    return [ov for ov in task if ov.partition("=")[0].lstrip("+~") in swept]


# ---- the stage ------------------------------------------------------------------------------
class SAETrainStage(Stage):
    """`run_dir/activations/train` -> `run_dir/sae/<name>/`, resumed from `checkpoint/`."""

    name, what, key, schema = "autoencoder.train", "SAE", "sae", SAETrainConfig
    marker = "cfg.json"
    sealed = ("sae_weights.safetensors", "sparsity.safetensors")
    verified = ("sae_weights.safetensors",)
    rename_key = "sae.name"

    @functools.cached_property
    def sae_name(self) -> str:
        return sae_name(self.c, _multirun_overrides())

    @functools.cached_property
    def train_dir(self) -> Path:
        """The input rows: `sae.hook_in` for a transcoder, else `sae.hook` (null: the only one)."""
        hook = self.c.hook_in if self.c.kind == "transcoder" else self.cfg.sae.get("hook")
        return RunLayout.of(self.cfg).activations("train", hook)

    @functools.cached_property
    def target_dir(self) -> Path | None:
        """A transcoder's output rows (`sae.hook_out`), else None."""
        if self.c.kind != "transcoder":
            return None
        return RunLayout.of(self.cfg).activations("train", self.c.hook_out)

    def target_manifest(self) -> dict[str, Any] | None:
        from autoencoder import shard_check

        return None if self.target_dir is None else shard_check.read_manifest(self.target_dir)

    def output_dir(self) -> Path:
        return RunLayout.of(self.cfg).sae(self.sae_name)

    def manifest(self) -> dict[str, Any]:
        from autoencoder import shard_check

        return shard_check.read_manifest(self.train_dir)

    def output_hash(self, world_size: int | None = None, manifest: dict[str, Any] | None = None) -> str:
        """The trained weights' hash: the output fields of `sae`, d_in, world size, shards, model."""
        m = manifest if manifest is not None else self.manifest()
        world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        out = self.target_manifest() if self.target_dir is not None else None
        return config_hash({"sae": math_config(self.c, int(m["d_in"]), world),
                            "shards": [s.get("sha256") for s in m.get("shards", [])],
                            "model": m.get("model"),
                            **({"target_shards": [s.get("sha256") for s in out.get("shards", [])]}
                               if out is not None else {})})

    def recorded_hash(self) -> str | None:
        path = self.output_dir() / "cfg.json"
        if not path.is_file():
            return None
        return (read_json(path, "SAE config").get("training") or {}).get("config_hash")

    def done(self) -> bool:
        """A finished SAE trained under this config and these shards."""
        try:
            meta = read_json(self.output_dir() / "cfg.json", "SAE config")
            manifest = read_json(self.train_dir / "manifest.json", "shard manifest")
        except UserError:
            return False
        world = int(meta.get("training", {}).get("world_size", 1))
        return ((self.output_dir() / "sae_weights.safetensors").is_file()
                and meta.get("training", {}).get("config_hash") == self.output_hash(world, manifest))

    def verify_inputs(self) -> None:
        """Refuse shards made from a model that changed since."""
        model = self.manifest().get("model") or {}
        weights = Path(str(model.get("path"))) / "model.safetensors"
        if model.get("weights_sha256") and weights.is_file():
            made_from = {"model": {"path": str(weights), "sha256": model["weights_sha256"]}}
            guard.check_provenance(self.train_dir, made_from,
                                   "rerun autoencoder.generate with overwrite=true")

    def overwrite(self) -> bool:
        """overwrite=true, or a checkpoint of this very config to resume."""
        ckpt = self.output_dir() / "checkpoint" / "state.json"
        resuming = (ckpt.is_file()
                    and read_json(ckpt, "SAE checkpoint").get("config_hash") == self.output_hash())
        return super().overwrite() or resuming

    def finished(self, result: dict[str, Any]) -> bool:
        return "stopped_at" not in result

    def work(self) -> dict[str, Any]:
        return _run(self)


def done(cfg: DictConfig) -> bool:
    """True when `run_dir/sae/<name>/` holds a finished SAE trained under this config and shards."""
    return SAETrainStage(cfg).done()


def run(cfg: DictConfig) -> dict[str, Any]:
    return SAETrainStage(cfg).run()


def _run(stage: SAETrainStage) -> dict[str, Any]:
    from tools.core.tracking import WandbConfig, init_wandb

    cfg, c = stage.cfg, stage.c
    wcfg = section(cfg, "wandb", WandbConfig)
    device = resolve_device(str(cfg.device))
    name, run_dir = stage.sae_name, Path(str(cfg.run_dir))
    train_dir, sae_dir = stage.train_dir, stage.output_dir()
    ckpt_dir = sae_dir / "checkpoint"

    manifest = stage.manifest()
    d_in = int(manifest["d_in"])
    if c.d_in is not None and c.d_in != d_in:
        raise UserError(f"config `sae.d_in`={c.d_in} but the shards in {train_dir} have d_in={d_in}")
    target_manifest = stage.target_manifest()
    if target_manifest is not None:
        from autoencoder.paired import require_paired

        require_paired(manifest, target_manifest, train_dir, stage.target_dir)
        if c.resample_steps:
            raise UserError(f"config `sae.resample_steps`={list(c.resample_steps)}: neuron resampling "
                            "needs kind=sae (a transcoder's decoder writes another space); use []")

    if stage.done() and not (ckpt_dir / "state.json").is_file():
        meta = read_json(sae_dir / "cfg.json", "SAE config")
        print(f"sae {name}: already trained under this config -> {sae_dir}")
        return summary(name, meta.get("metrics", {}), sae_dir, meta.get("training", {}))
    dist = Dist.start(device)
    rank, world = dist.rank, dist.world
    try:
        if c.batch_size % world:
            raise UserError(f"config `sae.batch_size`={c.batch_size} must be divisible by the "
                            f"{world} DDP ranks")
        device = dist.device(device)
        expect = {**math_config(c, d_in, world),
                  "shards": config_hash([e.get("sha256") for e in manifest.get("shards", [])])}
        spec = RunSpec(cfg=cfg, c=c, name=name, run_dir=run_dir, train_dir=train_dir, sae_dir=sae_dir,
                       manifest=manifest, device=device, expect=expect,
                       stage_hash=stage.output_hash(world, manifest), rank=rank, world=world,
                       target_dir=stage.target_dir, target_manifest=target_manifest)
        return Trainer(spec, lambda history: _wandb(init_wandb, wcfg, run_dir, name, c, history)).fit()
    finally:
        dist.close()


def _wandb(init_wandb, wcfg, run_dir: Path, name: str, c: SAETrainConfig, history: dict[str, Any]):
    """W&B run named after the SAE; a resumed run continues the same W&B run id."""
    saved = {k: os.environ.get(k) for k in ("WANDB_RUN_ID", "WANDB_RESUME")}
    if history.get("wandb_id"):
        os.environ["WANDB_RUN_ID"], os.environ["WANDB_RESUME"] = history["wandb_id"], "allow"
    try:
        return init_wandb(wcfg, run_dir, f"sae-{name}", {"sae": asdict(c)})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


main = stage_main(run)

if __name__ == "__main__":
    main()
