"""Several hook points under torchrun: 2 ranks write, for every hook, the rows one process writes, and
row i of every hook's folder is the same token (so a transcoder's [mlp_in, mlp_out] pair holds)."""

import shutil
from pathlib import Path

import numpy as np
import torch

from autoencoder import generate, shard_check
from autoencoder.paired import check_paired
from tests.helpers import torchrun
from tools.core.config import compose
from tools.core.files import read_json
from transformer.model import GPT, GPTConfig, save_model

HOOKS = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")


def _rows(folder: Path) -> np.ndarray:
    m = read_json(folder / "manifest.json")
    return np.concatenate([np.load(folder / s["file"]) for s in m["shards"]])


def test_two_ranks_write_every_hook_as_one_process(tmp_path):
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(block_size=64, n_embd=32, n_head=2, vocab_size=512)), tmp_path / "model")
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    np.random.default_rng(0).integers(0, 512, 20000, dtype=np.uint16).tofile(data / "train.bin")
    np.random.default_rng(1).integers(0, 512, 5000, dtype=np.uint16).tofile(data / "val.bin")

    def overrides(run: str) -> list[str]:
        run_dir = tmp_path / run
        if not (run_dir / "transformer").exists():
            shutil.copytree(tmp_path / "model", run_dir / "transformer")
        return [f"run_dir={run_dir}", f"data_dir={tmp_path / 'data'}", "data.name=tiny", "device=cpu",
                "activations.contexts=48", "activations.tokens_per_context=16",
                "activations.rows_per_shard=200",
                "activations.resample_rows=100", "activations.batch_contexts=8",
                "activations.hook=[mlp_in,mlp_out]", f"hydra.run.dir={tmp_path / 'hydra'}"]

    generate.run(compose(overrides("one")))
    torchrun("autoencoder.generate", overrides("two"), timeout=240)
    one, two = tmp_path / "one" / "activations" / "train", tmp_path / "two" / "activations" / "train"
    for hook in HOOKS:
        m = shard_check.read_manifest(two / hook)
        assert m["world_size"] == 2 and m["total_rows"] == 48 * 16
        assert shard_check.verify_shards(two / hook)["ok"]
    assert check_paired(two / HOOKS[0], two / HOOKS[1]) == 48 * 16
    # the same (input, output) row pairs as one process writes, whatever order the ranks left them in
    pairs = [{a.tobytes() + b.tobytes() for a, b in zip(_rows(d / HOOKS[0]), _rows(d / HOOKS[1]),
                                                        strict=True)} for d in (one, two)]
    assert pairs[0] == pairs[1] and len(pairs[0]) == 48 * 16
