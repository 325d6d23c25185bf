"""The in-RAM shuffle (autoencoder.in_ram) against the two-pass one: the same bytes, and the same
resume guarantees (a kill in pass 1, a stop or a kill while the shards are sealed, a full disk)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from autoencoder import generate, in_ram, shard_check
from autoencoder.scatter import Rows
from tests.autoencoder.test_generate import make_cfg, world  # noqa: F401 - the module's fixture
from tools.core import preempt
from tools.core.config import UserError
from tools.core.files import read_json


def files(directory: Path) -> dict[str, bytes]:
    """Every shard, resample.npy and the manifest's shard list of one output folder."""
    m = read_json(directory / "manifest.json")
    out = {p.name: p.read_bytes() for p in sorted(directory.glob("*.npy"))}
    out["entries"] = repr(m["shards"]).encode()
    return out


def generated(world: Path, run: str, *extra: str) -> tuple[dict, Path]:  # noqa: F811
    cfg = make_cfg(world, run, *extra)
    return generate.run(cfg), Path(cfg.run_dir) / "activations" / "train"


@pytest.fixture(scope="module")
def two_pass(world):  # noqa: F811
    summary, directory = generated(world, "two_pass", "activations.in_ram_gb=0")
    assert summary["shuffle"] == "two_pass"
    return directory


@pytest.mark.parametrize("hooks", [None, "[mlp_in,mlp_out]"])
def test_same_bytes_as_two_passes(world, hooks):  # noqa: F811
    extra = [f"activations.hook={hooks}"] if hooks else []
    runs = {}
    for name, budget in (("two", "0"), ("ram", "null")):
        summary, directory = generated(world, f"same_{name}_{bool(hooks)}", f"activations.in_ram_gb={budget}",
                                       *extra)
        runs[name] = summary, [directory / h for h in summary.get("hooks", {"": None})]
    assert runs["two"][0]["shuffle"] == "two_pass" and runs["ram"][0]["shuffle"] == "in_ram"
    for a, b in zip(runs["two"][1], runs["ram"][1], strict=True):
        fa, fb = files(a), files(b)
        assert len([k for k in fa if k.startswith("shard_")]) == 4
        assert fa == fb  # every shard, resample.npy and manifest entry, byte for byte
        assert not list(b.glob(".work-*")) and shard_check.verify_shards(b)["ok"]


def test_budget_decides(world):  # noqa: F811
    summary, _ = generated(world, "small_budget", "activations.in_ram_gb=0.0001")  # 100 kB < 0.25 MB
    assert summary["shuffle"] == "two_pass"
    summary, _ = generated(world, "big_budget", "activations.in_ram_gb=0.001")
    assert summary["shuffle"] == "in_ram"


def test_resume_after_kill_in_pass1(world, two_pass, monkeypatch):  # noqa: F811
    """Killed after a checkpoint with rows of the next batch already placed (as garbage): the
    resumed run places that batch again and ends with the same bytes."""
    real_flush, real_add, calls = in_ram.InRamScatter.flush, in_ram.InRamScatter.add, []

    def dying_flush(self, batches_done):
        real_flush(self, batches_done)
        calls.append(batches_done)
        if len(calls) == 2:
            first_row = sum(self.batch_rows[:batches_done])
            x = np.full((self.batch_rows[batches_done], self.d), 7.0, np.float16)
            real_add(self, batches_done, first_row, Rows(x))  # placed, never checkpointed
            raise KeyboardInterrupt

    monkeypatch.setattr(in_ram.InRamScatter, "due", lambda self: True)  # a checkpoint every batch
    monkeypatch.setattr(in_ram.InRamScatter, "flush", dying_flush)
    cfg = make_cfg(world, "ram_kill1")
    with pytest.raises(KeyboardInterrupt):
        generate.run(cfg)
    directory = Path(cfg.run_dir) / "activations" / "train"
    assert read_json(directory / ".work-rank000" / "progress.json")["batches"] == 2
    monkeypatch.setattr(in_ram.InRamScatter, "flush", real_flush)
    added = []

    def counted_add(self, i, *rest):
        added.append(i)
        real_add(self, i, *rest)

    monkeypatch.setattr(in_ram.InRamScatter, "add", counted_add)
    assert generate.run(cfg)["shuffle"] == "in_ram"
    assert added == list(range(2, 8))  # from the checkpoint on
    assert files(directory) == files(two_pass)


def test_resume_while_sealing(world, two_pass, monkeypatch):  # noqa: F811
    """A stop after the first shard is sealed, then a kill between moving a shard into place and
    checkpointing it: each rerun keeps what was done and ends with the same bytes."""
    cfg = make_cfg(world, "ram_kill2")
    directory = Path(cfg.run_dir) / "activations" / "train"
    asked = iter([False, True])  # pass 2 asks before each shard
    stop = SimpleNamespace(requested=lambda: next(asked, True), Preempted=preempt.Preempted,
                           saved_hint=preempt.saved_hint)
    monkeypatch.setattr(in_ram, "preempt", stop)
    with pytest.raises(preempt.Preempted, match="shard 1 of 4 \\(pass 2\\)"):
        generate.run(cfg)
    assert [p.name for p in directory.glob("shard_*.npy")] == ["shard_00000.npy"]
    first = os.stat(directory / "shard_00000.npy").st_ino
    monkeypatch.setattr(in_ram, "preempt", preempt)

    real_write, writes = in_ram.write_json, []

    def dying_write(path, obj):
        writes.append(path)
        if len(writes) == 1:  # shard_00001.npy is in place, its checkpoint is not
            raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(in_ram, "write_json", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate.run(cfg)
    assert sorted(p.name for p in directory.glob("shard_*.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    monkeypatch.setattr(in_ram, "write_json", real_write)
    generate.run(cfg)
    assert os.stat(directory / "shard_00000.npy").st_ino == first  # not rewritten
    assert files(directory) == files(two_pass)


def test_no_room_is_one_line(world, monkeypatch):  # noqa: F811
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(in_ram.os, "posix_fallocate", full)
    cfg = make_cfg(world, "ram_full")
    with pytest.raises(UserError, match=r"no room for .*part_0000\d\.npy \(.* bytes: .*No space left"):
        generate.run(cfg)
    with pytest.raises(UserError, match="incomplete"):
        shard_check.read_manifest(Path(cfg.run_dir) / "activations" / "train")
