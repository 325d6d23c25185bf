"""CUDA paths at toy size (marked `cuda`: skipped with a reason where no GPU is present; run by
tools/bench/gpu_check.sh): bf16 autocast in the LM and SAE steps, the pinned-memory reader feeding
the trainer, and the bf16 feature pass agreeing with fp32."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from tests.helpers.pipeline import NAME, TINY, write_corpus
from tools.core.config import compose

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    write_corpus(root / "corpus")
    over = [f"run_dir={root / 'run'}", f"data_dir={root / 'data'}", f"data.files={root}/corpus/*.txt",
            *[o for o in TINY if o != "device=cpu"], "device=cuda", "sae.kernel=auto", "sae.autocast=true"]
    out = {}
    for module in ("transformer.prepare", "transformer.train", "autoencoder.generate", "autoencoder.train",
                   "tools.top_activations"):
        out[module] = importlib.import_module(module).run(compose(over))
    return root, over, out


def test_lm_trains_under_bf16_autocast(gpu_run):
    _, _, out = gpu_run
    lm = out["transformer.train"]
    assert math.isfinite(lm["val_loss"]) and lm["tokens_per_s"] > 0 and lm["mfu"] > 0


def test_sae_trains_from_pinned_shards_under_autocast(gpu_run):
    root, _, out = gpu_run
    s = out["autoencoder.train"]
    assert math.isfinite(s["explained_variance"]) and s["l0"] > 0
    meta = json.loads((root / f"run/sae/{NAME}/cfg.json").read_text())
    assert meta["training"]["steps"] == 24


def test_bf16_feature_pass_agrees_with_fp32(gpu_run):
    root, over, _ = gpu_run
    ta = importlib.import_module("tools.top_activations")
    ta.run(compose([*over, "features.dtype=bfloat16", "overwrite=true"]))
    bf = [json.loads(line) for line in (root / f"run/features/{NAME}/features.jsonl").open()]
    ta.run(compose([*over, "features.dtype=float32", "overwrite=true"]))
    fp = [json.loads(line) for line in (root / f"run/features/{NAME}/features.jsonl").open()]
    pairs = [(a, b) for a, b in zip(bf, fp, strict=True) if a["top"] and b["top"]]
    agree = [a["top"][0]["ctx"] == b["top"][0]["ctx"] for a, b in pairs]
    assert agree and sum(agree) / len(agree) >= 0.6  # ties among toy contexts may swap
    rel = [abs(a["max_act"] - b["max_act"]) / max(b["max_act"], 1e-6) for a, b in zip(bf, fp, strict=True)]
    assert max(rel) < 0.05


def test_reader_delivers_on_device(tmp_path):
    import numpy as np

    from autoencoder import shard_reader, shard_write

    rows = np.random.default_rng(0).standard_normal((512, 64)).astype(np.float16)
    shard_write.write_shards(tmp_path, rows, 128)
    with shard_reader.ShardReader(tmp_path, 64, device="cuda", dtype=torch.bfloat16) as r:
        b = next(iter(r))
    assert b.device.type == "cuda" and b.dtype == torch.bfloat16 and b.shape == (64, 64)
