"""Train the subject GPT on `data_dir/<data.name>/train.bin` (nanoGPT's loop, made resumable).

AdamW (weight decay on 2-D weights only), linear warmup + cosine decay, gradient accumulation,
clipping, periodic val loss, autocast on CUDA, optional torch.compile, DDP under torchrun (NCCL on
GPU, gloo on CPU), W&B. Checkpoints in `run_dir/transformer/checkpoint/` (safetensors + JSON);
a run killed and restarted with the same command continues bit-for-bit: each step's batch is a
pure function of (seed, step), and model, optimizer and RNG state are restored.

    python -m transformer.train run_dir=runs/demo preset=demo
    torchrun --nproc_per_node=8 -m transformer.train preset=anthropic data=openwebtext
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tools.core import guard
from tools.core.config import UserError, output_fields, resolve_device, section, stage_main
from tools.core.distributed import Dist
from tools.core.files import config_hash, read_json
from tools.core.layout import RunLayout
from tools.core.stage import Stage
from tools.core.tracking import WandbConfig
from transformer.config import TrainConfig
from transformer.trainer import Trainer


def output_hash(c: TrainConfig, meta: dict, cfg: DictConfig) -> str:
    """The trained model's hash: the output fields of `transformer`, the tokens' hash and the seed."""
    return config_hash({"train": output_fields(c), "tokens": meta.get("config_hash"), "seed": int(cfg.seed)})


class TrainStage(Stage):
    """`data_dir/<data.name>/{train,val}.bin` -> `run_dir/transformer/` (model.safetensors, config.json)."""

    name, what, key, schema = "transformer.train", "transformer", "transformer", TrainConfig
    marker = "config.json"
    sealed = ("model.safetensors",)

    def output_dir(self) -> Path:
        return RunLayout.of(self.cfg).transformer

    def data_dir(self) -> Path:
        return Path(str(self.cfg.data_dir)) / str(self.cfg.data.name)

    def output_hash(self) -> str | None:
        meta = self.data_dir() / "meta.json"
        return output_hash(self.c, read_json(meta), self.cfg) if meta.is_file() else None

    def done(self) -> bool:
        try:
            conf = read_json(self.output_dir() / "config.json")
            read_json(self.data_dir() / "meta.json")
        except UserError:
            return False
        return ((self.output_dir() / "model.safetensors").is_file()
                and conf.get("config_hash") == self.output_hash())

    def verify_inputs(self) -> None:
        guard.verify_sealed(self.data_dir(), ["train.bin", "val.bin"], "token")

    def guard(self) -> None:
        """Intact token files; a finished model of another config is replaced only with overwrite=true."""
        if (self.data_dir() / "meta.json").is_file():
            super().guard()
        else:
            self.verify_inputs()

    def finished(self, result: dict[str, Any]) -> bool:
        return bool(result.get("complete"))

    def work(self) -> dict[str, Any]:
        return _run(self.cfg, self.c)


def done(cfg: DictConfig) -> bool:
    return TrainStage(cfg).done()


def run(cfg: DictConfig) -> dict[str, Any]:
    return TrainStage(cfg).run()


def _run(cfg: DictConfig, c: TrainConfig) -> dict[str, Any]:
    wcfg = section(cfg, "wandb", WandbConfig)
    run_dir = Path(str(cfg.run_dir))
    data_dir = Path(str(cfg.data_dir)) / str(cfg.data.name)
    device = resolve_device(str(cfg.device))
    dist = Dist.start(device)
    device = dist.device(device)
    threads = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        meta = read_json(data_dir / "meta.json", "token meta (run transformer.prepare first)")
        return Trainer(cfg, c, wcfg, run_dir, data_dir, device, dist, output_hash(c, meta, cfg)).fit()
    finally:
        torch.set_num_threads(threads)  # the caller's setting (the pipeline, tests) comes back
        dist.close()


main = stage_main(run)

if __name__ == "__main__":
    main()
