"""Shard writer/reader: round trip, order, resume, DDP split, and every bad-input error."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from autoencoder import shard_check, shard_reader, shard_write, shards
from autoencoder.shard_check import read_manifest, verify_shards
from autoencoder.shard_reader import ShardReader
from autoencoder.shard_write import write_shards
from tools.core.config import UserError
from tools.core.files import read_json, write_json

D = 8


def labelled(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    """Rows whose first two columns encode the row id exactly in fp16 (ids < 2**20)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float16)
    ids = np.arange(n)
    x[:, 0], x[:, 1] = ids // 1024, ids % 1024
    return x


def ids_of(batch: torch.Tensor) -> np.ndarray:
    b = batch.float().numpy()
    return (b[:, 0].astype(np.int64) * 1024 + b[:, 1].astype(np.int64))


def take(reader: ShardReader, n_batches: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(reader), n_batches))


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "acts"
    write_shards(d, labelled(1000), rows_per_shard=300, seed=3, resample_rows=100)
    return d


def test_write_shards_layout(shard_dir):
    m = read_manifest(shard_dir, d_in=D, dtype="float16")
    assert m["complete"] is True and m["total_rows"] == 1000 and m["format"] == shard_check.FORMAT
    assert [s["rows"] for s in m["shards"]] == [300, 300, 300, 100]
    a = np.load(shard_dir / "shard_00001.npy", mmap_mode="r")
    assert a.dtype == np.float16 and a.shape == (300, D)
    np.testing.assert_array_equal(np.asarray(a), labelled(1000)[300:600])
    res = np.load(shard_dir / "resample.npy")
    assert res.shape == (100, D) and len(set(ids_of(torch.from_numpy(res)))) == 100
    assert verify_shards(shard_dir)["ok"]


def test_round_trip_one_epoch_exact(shard_dir):
    x = labelled(1000)
    with ShardReader(shard_dir, 64, seed=1) as r:
        assert r.d_in == D and r.total_rows == 1000 and r.rows_per_epoch() == 1000
        batches = take(r, 16)  # 1024 rows: one epoch and 24 rows of the next
    assert all(b.shape == (64, D) and b.dtype == torch.float32 for b in batches)
    rows = torch.cat(batches)[:1000]
    ids = ids_of(rows)
    assert sorted(ids.tolist()) == list(range(1000))  # every row exactly once
    np.testing.assert_array_equal(rows.numpy(), x[ids].astype(np.float32))  # values equal in fp16
    assert not np.array_equal(ids, np.arange(1000))  # and not in file order


def test_bf16_and_batch_larger_than_data(shard_dir):
    with ShardReader(shard_dir, 1500, dtype=torch.bfloat16) as r:
        b16 = next(iter(r))
    with ShardReader(shard_dir, 1500) as r:
        b = next(iter(r))
    assert b16.dtype == torch.bfloat16 and b16.shape == (1500, D)
    assert torch.equal(b16, b.to(torch.bfloat16))
    counts = np.bincount(ids_of(b), minlength=1000)
    assert counts.min() >= 1 and counts.max() <= 2  # spans an epoch boundary


def test_deterministic_and_epochs_differ(shard_dir):
    def epoch_ids(seed):
        with ShardReader(shard_dir, 100, seed=seed) as r:
            return ids_of(torch.cat(take(r, 20)))

    a, b, c = epoch_ids(5), epoch_ids(5), epoch_ids(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[:1000], a[1000:])  # a new permutation every epoch
    assert sorted(a[1000:].tolist()) == list(range(1000))


def test_state_dict_resume_exact(shard_dir):
    with ShardReader(shard_dir, 48, seed=2, prefetch=4) as r:
        it = iter(r)
        first = [next(it) for _ in range(7)]
        state = json.loads(json.dumps(r.state_dict()))  # JSON-serialisable
        rest = [next(it) for _ in range(30)]  # crosses epochs
    with ShardReader(shard_dir, 48, seed=2) as r2:
        r2.load_state_dict(state)
        resumed = take(r2, 30)
    for a, b in zip(rest, resumed, strict=True):
        assert torch.equal(a, b)
    assert len(first) == 7


def test_break_then_continue(shard_dir):
    with ShardReader(shard_dir, 50, seed=0) as r:
        whole = ids_of(torch.cat(take(r, 1)))
        for _ in r:  # a second loop continues after the last batch handed out, not after prefetch
            whole = np.concatenate([whole, ids_of(_)])
            break
    with ShardReader(shard_dir, 50, seed=0) as r:
        ref = ids_of(torch.cat(take(r, 2)))
    np.testing.assert_array_equal(whole, ref)


def test_resume_mismatch(shard_dir):
    with ShardReader(shard_dir, 32, seed=1) as r:
        take(r, 2)
        state = r.state_dict()
    with ShardReader(shard_dir, 32, seed=2) as r2, pytest.raises(UserError, match="seed"):
        r2.load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_split_disjoint_and_complete(shard_dir, world):
    per_rank = []
    for rank in range(world):
        with ShardReader(shard_dir, 10, seed=4, rank=rank, world_size=world) as r:
            n = r.rows_per_epoch()
            batches = take(r, -(-n // 10))
            per_rank.append(set(ids_of(torch.cat(batches)[:n]).tolist()))
            assert len(per_rank[-1]) == n
    assert sum(len(s) for s in per_rank) == 1000
    assert set().union(*per_rank) == set(range(1000))
    sizes = [len(s) for s in per_rank]
    assert max(sizes) - min(sizes) <= 300  # roughly even


# --------------------------------------------------------------------------- bad input


def test_missing_and_incomplete_manifest(tmp_path, shard_dir):
    with pytest.raises(UserError, match="manifest not found"):
        read_manifest(tmp_path / "nowhere")
    m = read_json(shard_dir / "manifest.json")
    write_json(shard_dir / "manifest.json", {**m, "complete": False})
    with pytest.raises(UserError, match="incomplete"):
        read_manifest(shard_dir)
    with pytest.raises(UserError, match="incomplete"):
        ShardReader(shard_dir, 8)


def test_mismatched_d_in_and_dtype(shard_dir):
    with pytest.raises(UserError, match="d_in=8 but d_in=512"):
        read_manifest(shard_dir, d_in=512)
    with pytest.raises(UserError, match="bfloat16"):
        read_manifest(shard_dir, dtype="bfloat16")
    m = read_json(shard_dir / "manifest.json")
    write_json(shard_dir / "manifest.json", {**m, "dtype": "float32"})
    with pytest.raises(UserError, match="float32"):
        read_manifest(shard_dir)
    write_json(shard_dir / "manifest.json", {**m, "d_in": 16})
    with pytest.raises(UserError, match="shard_00000.npy.*manifest expects float16 \\[300, 16\\]"):
        ShardReader(shard_dir, 8)


def test_truncated_shard(shard_dir):
    p = shard_dir / "shard_00002.npy"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(UserError, match="shard_00002.npy.*bytes, expected"):
        ShardReader(shard_dir, 8)
    with pytest.raises(UserError, match="shard_00002.npy"):
        verify_shards(shard_dir)


def test_altered_shard_sha256(shard_dir):
    p = shard_dir / "shard_00001.npy"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    ShardReader(shard_dir, 8).close()  # same size: the reader's cheap check passes ...
    with pytest.raises(UserError, match="shard_00001.npy: sha256"):
        verify_shards(shard_dir)  # ... verification does not


def test_missing_shard(shard_dir):
    (shard_dir / "shard_00003.npy").unlink()
    with pytest.raises(UserError, match="shard missing.*shard_00003.npy"):
        ShardReader(shard_dir, 8)


def test_inspect_cli(shard_dir, tmp_path, capsys):
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    (run_dir / "activations").mkdir(parents=True)
    shard_dir.rename(run_dir / "activations" / "val")
    cfg = OmegaConf.create({"run_dir": str(run_dir), "activations": {"split": "val"}})
    out = shards.run(cfg)
    assert out["shards"] == 4 and out["rows"] == 1000
    assert "verified 4 shards" in capsys.readouterr().out


@pytest.mark.cuda
def test_cuda_pinned_batches_match_cpu(shard_dir):
    with ShardReader(shard_dir, 100, seed=1, device="cuda") as r:
        gpu = [b.cpu() for b in take(r, 12)]
    with ShardReader(shard_dir, 100, seed=1) as r:
        cpu = take(r, 12)
    assert all(g.dtype == torch.float32 and torch.equal(g, c) for g, c in zip(gpu, cpu, strict=True))


def test_reader_refuses_a_corrupt_shard_before_using_its_rows(tmp_path):
    rows = np.random.default_rng(3).standard_normal((600, 16)).astype(np.float16)
    shard_write.write_shards(tmp_path, rows, 200)
    with shard_reader.ShardReader(tmp_path, 50, seed=1) as r:
        want = [b for _, b in zip(range(12), r, strict=False)]  # every shard once (600 rows)
    path = tmp_path / shard_write.shard_name(1)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # one bit of one value, header and size intact
    path.write_bytes(bytes(data))
    # the old reader: silently different
    with shard_reader.ShardReader(tmp_path, 50, seed=1, verify=False) as r:
        got = [b for _, b in zip(range(12), r, strict=False)]
    assert any(not torch.equal(a, b) for a, b in zip(want, got, strict=True))
    with shard_reader.ShardReader(tmp_path, 50, seed=1) as r:
        with pytest.raises(UserError, match=f"shard {path}: sha256"):
            for _ in zip(range(12), r, strict=False):
                pass
