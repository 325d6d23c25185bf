"""Generation of activation shards from a tiny random GPT: content, shuffling, determinism, resume."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autoencoder import generate, scatter, shard_check, shard_reader, shard_write
from tests.helpers import torchrun
from tools.core.config import UserError, compose
from tools.core.files import read_json
from transformer.model import GPT, GPTConfig, save_model

C, T, B, L = 60, 16, 8, 64  # contexts, tokens per context, contexts per batch, block size


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=L, n_embd=32, n_head=2, vocab_size=512))
    save_model(model, root / "model")
    rng = np.random.default_rng(0)
    data = root / "data" / "tiny"
    data.mkdir(parents=True)
    rng.integers(0, 512, 20000, dtype=np.uint16).tofile(data / "train.bin")
    rng.integers(0, 512, 5000, dtype=np.uint16).tofile(data / "val.bin")
    return root


def make_cfg(world: Path, run: str, *extra: str):
    run_dir = world / run
    if not (run_dir / "transformer").exists():
        shutil.copytree(world / "model", run_dir / "transformer")
    return compose([f"run_dir={run_dir}", f"data_dir={world / 'data'}", "data.name=tiny", "device=cpu",
                    f"activations.contexts={C}", "activations.val_contexts=12",
                    f"activations.tokens_per_context={T}", "activations.rows_per_shard=250",
                    "activations.resample_rows=200", f"activations.batch_contexts={B}", *extra])


def shard_rows(directory: Path) -> np.ndarray:
    m = read_json(directory / "manifest.json")
    return np.concatenate([np.load(directory / s["file"]) for s in m["shards"]])


def expected_rows(world: Path, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Recompute every row the way generation defines it; returns rows and their context ids."""
    from transformer.model import load_model

    model = load_model(world / "model")
    tokens = np.fromfile(world / "data" / "tiny" / "train.bin", dtype=np.uint16)
    plan = scatter.ContextPlan(int(cfg.seed), "train", len(tokens), L, T)
    rows, ctx = [], []
    for lo in range(0, C, B):
        hi = min(lo + B, C)
        starts, pos = plan.get(lo, hi)
        h = model.mlp_acts(torch.from_numpy(tokens[starts[:, None] + np.arange(L)].astype(np.int64)))
        g = torch.gather(h, 1, torch.from_numpy(pos)[:, :, None].expand(-1, -1, h.shape[-1]))
        rows.append(g.half().reshape(-1, h.shape[-1]).numpy())
        ctx.append(np.repeat(np.arange(lo, hi), T))
    return np.concatenate(rows), np.concatenate(ctx)


def as_keys(rows: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in rows]


@pytest.fixture(scope="module")
def generated(world):
    cfg = make_cfg(world, "run_a")
    summary = generate.run(cfg)
    return cfg, summary


def test_manifest_and_verify(generated):
    cfg, summary = generated
    assert summary["shuffle"] == "in_ram"  # 0.25 MB: well within half the available RAM
    directory = Path(cfg.run_dir) / "activations" / "train"
    m = shard_check.read_manifest(directory, d_in=128, dtype="float16")
    assert m["complete"] and m["total_rows"] == C * T == summary["rows"]
    assert m["hook_name"] == "blocks.0.mlp.hook_post" and m["split"] == "train" and m["block_size"] == L
    assert m["contexts"] == C and m["tokens_per_context"] == T and m["rows_per_shard"] == 250
    assert m["model"]["config_hash"] and m["model"]["path"].endswith("transformer")
    assert len(m["shards"]) == 4 and abs(m["shards"][0]["rows"] - 240) < 80  # random scatter, ~C*T/4
    assert shard_check.verify_shards(directory)["ok"]
    assert not list(directory.glob(".work-*")) and not list(directory.glob(".*tmp*"))
    assert generate.done(cfg)


def test_rows_are_the_models_activations(world, generated):
    cfg, _ = generated
    got = shard_rows(Path(cfg.run_dir) / "activations" / "train")
    want, _ = expected_rows(world, cfg)
    assert sorted(as_keys(got)) == sorted(as_keys(want))  # same multiset of rows, bit for bit


def test_rows_shuffled_across_contexts(world, generated):
    cfg, _ = generated
    want, ctx = expected_rows(world, cfg)
    where = dict(zip(as_keys(want), ctx.tolist(), strict=True))
    directory = Path(cfg.run_dir) / "activations" / "train"
    first = np.load(directory / "shard_00000.npy")[:64]
    distinct = len({where[k] for k in as_keys(first)})
    # unshuffled output would hold 64 / T = 4 contexts; uniform shuffling ~ C(1 - e^(-64/C)) = 39
    assert distinct >= 28, distinct
    with shard_reader.ShardReader(directory, 64, seed=0) as r:
        batch = next(iter(r)).half().numpy()
    assert len({where[k] for k in as_keys(batch)}) >= 28


def test_resample_subset(world, generated):
    cfg, _ = generated
    directory = Path(cfg.run_dir) / "activations" / "train"
    res = np.load(directory / "resample.npy")
    rows = shard_rows(directory)
    assert res.shape == (200, 128) and res.dtype == np.float16
    keys = set(as_keys(rows))
    assert all(k in keys for k in as_keys(res))  # a sample of the shards' rows
    assert len(set(as_keys(res))) == 200  # without replacement
    # the same distribution: per-column means agree within a few standard errors
    r32, s32 = res.astype(np.float64), rows.astype(np.float64)
    se = s32.std(0) / np.sqrt(200) + 1e-6
    z = np.abs(r32.mean(0) - s32.mean(0)) / se
    assert np.mean(z < 3) > 0.95


def test_deterministic_and_skip(world, generated):
    cfg, _ = generated
    a = read_json(Path(cfg.run_dir) / "activations" / "train" / "manifest.json")
    cfg_b = make_cfg(world, "run_b")
    generate.run(cfg_b)
    b = read_json(Path(cfg_b.run_dir) / "activations" / "train" / "manifest.json")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    before = os.stat(Path(cfg.run_dir) / "activations" / "train" / "shard_00000.npy").st_mtime_ns
    out = generate.run(cfg)  # complete: nothing rewritten
    assert out["seconds"] == 0.0
    assert os.stat(Path(cfg.run_dir) / "activations" / "train" / "shard_00000.npy").st_mtime_ns == before
    assert not generate.done(make_cfg(world, "run_a", "seed=7"))  # another seed is another output


def test_val_split_and_block_cap(world):
    cfg = make_cfg(world, "run_a", "activations.split=val", "activations.block_size=1000")
    out = generate.run(cfg)
    m = shard_check.read_manifest(Path(cfg.run_dir) / "activations" / "val")
    assert out["rows"] == 12 * T and m["split"] == "val" and m["resample_rows"] == 12 * T
    assert m["block_size"] == L  # capped at the model's
    cfg = make_cfg(world, "run_a", "activations.split=val", "activations.block_size=32")
    assert not generate.done(cfg)
    with pytest.raises(UserError, match="finished activation directory.*overwrite=true"):
        generate.run(cfg)  # a finished output of another config is not replaced unasked
    generate.run(make_cfg(world, "run_a", "activations.split=val", "activations.block_size=32",
                          "overwrite=true"))
    assert shard_check.read_manifest(Path(cfg.run_dir) / "activations" / "val")["block_size"] == 32


def test_resume_after_kill_in_scatter(world, generated, monkeypatch):
    ref = read_json(Path(generated[0].run_dir) / "activations" / "train" / "manifest.json")
    cfg = make_cfg(world, "run_kill1", "activations.in_ram_gb=0")  # the two-pass shuffle
    real_flush, calls = scatter.Scatter.flush, []

    def dying_flush(self, batches_done):
        real_flush(self, batches_done)
        calls.append(batches_done)
        if len(calls) == 2:  # data appended after the last checkpoint, then the process dies
            with open(self.bucket(0), "ab") as f:
                f.write(b"\x01" * 256 * 6)
            raise KeyboardInterrupt

    monkeypatch.setattr(scatter.Scatter, "flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        generate.run(cfg)
    with pytest.raises(UserError, match="incomplete"):
        shard_check.read_manifest(Path(cfg.run_dir) / "activations" / "train")
    monkeypatch.setattr(scatter.Scatter, "flush", real_flush)
    generate.run(cfg)
    got = read_json(Path(cfg.run_dir) / "activations" / "train" / "manifest.json")
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in ref["shards"]]


def test_resume_after_kill_mid_shard_and_disk_full(world, generated, monkeypatch):
    ref = read_json(Path(generated[0].run_dir) / "activations" / "train" / "manifest.json")
    cfg = make_cfg(world, "run_kill2", "activations.in_ram_gb=0")
    directory = Path(cfg.run_dir) / "activations" / "train"
    real_write, n = shard_write.write_shard, []

    def full_disk(path, rows, n_rows=None, d_in=None):
        n.append(path)
        if path.name == "shard_00002.npy" and len(n) == 3:  # the third shard: no space part-way
            def chunks():
                yield next(iter(rows))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(path, chunks(), n_rows, d_in)
        return real_write(path, rows, n_rows, d_in)

    monkeypatch.setattr(shard_write, "write_shard", full_disk)
    with pytest.raises(UserError, match="shard_00002.npy failed.*No space left.*rerun to resume"):
        generate.run(cfg)
    assert sorted(p.name for p in directory.glob("shard_*.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    assert not list(directory.glob(".shard_*"))  # no partial file left behind
    kept = {p.name: os.stat(p).st_ino for p in directory.glob("shard_*.npy")}
    monkeypatch.setattr(shard_write, "write_shard", real_write)
    written = []
    monkeypatch.setattr(shard_write, "write_shard", lambda p, *a: written.append(p.name) or real_write(p, *a))
    generate.run(cfg)
    # completed shards were not rewritten
    assert [w for w in written if w.startswith("shard_")] == ["shard_00002.npy", "shard_00003.npy"]
    assert all(os.stat(directory / k).st_ino == v for k, v in kept.items())
    got = read_json(directory / "manifest.json")
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in ref["shards"]]


def test_torchrun_two_ranks(world, generated):
    """Each rank writes its shards, rank 0 one manifest; together the same rows as one process."""
    cfg = make_cfg(world, "run_ddp")
    overrides = [f"run_dir={cfg.run_dir}", f"data_dir={world / 'data'}", "data.name=tiny", "device=cpu",
                 f"activations.contexts={C}", f"activations.tokens_per_context={T}",
                 "activations.rows_per_shard=250", "activations.resample_rows=200",
                 f"activations.batch_contexts={B}", "hydra.run.dir=" + str(world / "hydra")]
    torchrun("autoencoder.generate", overrides, timeout=180)
    directory = Path(cfg.run_dir) / "activations" / "train"
    m = shard_check.read_manifest(directory)
    assert m["world_size"] == 2 and m["total_rows"] == C * T and len(m["shards"]) == 4
    assert shard_check.verify_shards(directory)["ok"]
    single = Path(generated[0].run_dir) / "activations" / "train"
    assert sorted(as_keys(shard_rows(directory))) == sorted(as_keys(shard_rows(single)))
    res_a, res_b = np.load(directory / "resample.npy"), np.load(single / "resample.npy")
    assert sorted(as_keys(res_a)) == sorted(as_keys(res_b))  # the same uniform sample
    assert generate.done(cfg)  # shards from any world size serve
    # a rerun skips on every rank (no rank left waiting)
    assert "nothing to do" in torchrun("autoencoder.generate", overrides, timeout=180)


# --------------------------------------------------------------------------- bad input


def test_missing_model(world):
    cfg = make_cfg(world, "run_nomodel")
    shutil.rmtree(Path(cfg.run_dir) / "transformer")
    with pytest.raises(UserError, match="transformer config not found"):
        generate.run(cfg)
    assert not generate.done(cfg)


def test_missing_data(world):
    cfg = make_cfg(world, "run_a", "data.name=absent")
    with pytest.raises(UserError, match="tokens not found: .*absent/train.bin"):
        generate.run(cfg)


@pytest.mark.parametrize("override, match", [
    ("activations.tokens_per_context=100", "tokens_per_context`=100 exceeds the context length 64"),
    ("activations.block_size=8", "tokens_per_context`=16 exceeds the context length 8"),
    ("activations.split=test", "split`='test': expected train or val"),
    ("activations.rows_per_shard=0", "rows_per_shard`=0"),
    ("activations.in_ram_gb=-1", "in_ram_gb`=-1.*null or a number >= 0"),
    ("+activations.contxts=5", "contxts"),
])
def test_bad_config(world, override, match):
    with pytest.raises(UserError, match=match):
        generate.run(make_cfg(world, "run_a", override))


def test_token_out_of_vocab(world, tmp_path):
    data = world / "data" / "badvocab"
    data.mkdir(exist_ok=True)
    np.full(2000, 600, dtype=np.uint16).tofile(data / "train.bin")
    with pytest.raises(UserError, match="token id 600 >= the model's vocab_size 512"):
        generate.run(make_cfg(world, "run_badvocab", "data.name=badvocab"))


def test_fp16_overflow_is_an_error(world):
    cfg = make_cfg(world, "run_overflow")
    from transformer.model import load_model

    model = load_model(Path(cfg.run_dir) / "transformer")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1e6)  # activations far beyond fp16's 65504
    save_model(model, Path(cfg.run_dir) / "transformer")
    with pytest.raises(UserError, match="non-finite activations"):
        generate.run(cfg)


def test_transcoder_pair_on_our_gpt(world, generated):
    """[mlp_in, mlp_out] in one run: row i of the input folder maps through the MLP to row i of the
    output folder; a folder of another run (another model folder) does not pair with them."""
    from autoencoder.paired import check_paired
    from transformer.model import load_model

    cfg = make_cfg(world, "pair", "activations.hook=[mlp_in,mlp_out]")
    generate.run(cfg)
    base = Path(cfg.run_dir) / "activations" / "train"
    a_dir, b_dir = base / "blocks.0.ln2.hook_normalized", base / "blocks.0.hook_mlp_out"
    assert check_paired(a_dir, b_dir) == C * T
    mlp = load_model(world / "model").transformer.h[0].mlp
    a, b = shard_rows(a_dir), shard_rows(b_dir)
    with torch.no_grad():
        mapped = mlp.out(mlp.hidden(torch.from_numpy(a[:50]).float())).numpy()
    np.testing.assert_allclose(mapped, b[:50].astype(np.float32), rtol=2e-2, atol=2e-3)
    neurons = Path(generated[0].run_dir) / "activations" / "train"  # hook=neurons, another run's model copy
    with pytest.raises(UserError, match=r"train and .*normalized do not hold the same rows \(model differs"):
        check_paired(neurons, a_dir)
