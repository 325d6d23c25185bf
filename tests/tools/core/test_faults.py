"""Fault injection over the whole pipeline at toy size.

- every stage, SIGKILLed at seeded commit points (an atomic rename or an fsync, just before or
  after it) and rerun, ends with the same bytes as an uninterrupted run, no temporaries and no lock;
- every long stage, sent SIGTERM (or SIGINT) mid-run, saves its resume state at that point, exits
  128 + the signal with one line saying how to resume, and its rerun ends with the same bytes;
- a flipped byte in each kind of artifact is refused with a line naming the file;
- two writers on one folder: one wins, the other refuses; a changed SAE is not described unseen.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.pipeline import NAME, TINY, write_corpus
from tools.core import guard
from tools.core.config import UserError, compose

FAULT_RUNNER = ROOT / "tests" / "helpers" / "fault_runner.py"
# stage -> (module, output folder relative to the tmp root)
STAGES = {
    "prepare": ("transformer.prepare", "data/local"),
    "transformer": ("transformer.train", "run/transformer"),
    "activations": ("autoencoder.generate", "run/activations/train"),
    "sae": ("autoencoder.train", f"run/sae/{NAME}"),
    "features": ("tools.top_activations", f"run/features/{NAME}"),
    "describe": ("tools.describe.stage", f"run/descriptions/{NAME}"),
}
VOLATILE = {"scan_tokens_per_s"}  # a timing, the one figure that may differ between runs
KILL_POINTS = 2  # per stage; seeded


@dataclass
class World:
    root: Path
    overrides: list[str]
    commits: dict[str, int]  # commit points of each stage's uninterrupted run
    ref: dict[str, dict[str, object]]  # each stage's output, uninterrupted

    def cfg(self, *extra: str):
        return compose([*self.overrides, *extra])


def read_tree(folder: Path) -> dict[str, object]:
    """Every file under `folder` (hidden ones too); JSON parsed with timings dropped; site/ skipped
    (describe re-renders it)."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel.startswith("site/"):
            continue
        data = p.read_bytes()
        if p.suffix == ".json":
            obj = json.loads(data)
            if isinstance(obj, dict):
                obj = {k: v for k, v in obj.items() if k not in VOLATILE}
            out[rel] = obj
        else:
            out[rel] = data
    return out




def count_commits(fn) -> int:
    n = [0]

    def wrap(real):
        def commit(*a, **k):
            n[0] += 1
            return real(*a, **k)
        return commit

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", wrap(os.replace))
        mp.setattr(os, "fsync", wrap(os.fsync))
        fn()
    return n[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("faults")
    write_corpus(root / "corpus")
    overrides = [f"run_dir={root / 'run'}", f"data_dir={root / 'data'}", f"data.files={root}/corpus/*.txt",
                 *TINY]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocesses: the same arithmetic
    try:
        commits, ref = {}, {}
        for stage, (module, out) in STAGES.items():
            mod = importlib.import_module(module)
            commits[stage] = count_commits(lambda mod=mod: mod.run(compose(overrides)))
            ref[stage] = read_tree(root / out)
        yield World(root, overrides, commits, ref)
    finally:
        torch.set_num_threads(threads)


def run_cli(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_stage_reruns_to_the_same_bytes(world, stage, one_thread):
    module, out = STAGES[stage]
    folder = world.root / out
    rng = np.random.default_rng([13, list(STAGES).index(stage)])
    n = world.commits[stage]
    assert n >= 2, (stage, n)
    for i in range(KILL_POINTS):  # one seeded point in each equal part of the run
        lo, hi = 1 + i * n // KILL_POINTS, max(1 + i * n // KILL_POINTS, (i + 1) * n // KILL_POINTS)
        k, when = int(rng.integers(lo, hi + 1)), str(rng.choice(["before", "after"]))
        shutil.rmtree(folder)
        r = run_cli([str(FAULT_RUNNER), str(k), when, module, *world.overrides])
        assert r.returncode in (-9, 0), (stage, k, when, r.stderr[-2000:])
        importlib.import_module(module).run(world.cfg())
        got = read_tree(folder)
        assert sorted(got) == sorted(world.ref[stage]), (stage, k, when, sorted(got))  # no leftovers
        for rel, data in world.ref[stage].items():
            assert got[rel] == data, (stage, k, when, rel)
        assert not guard.lock_path(folder).exists()


# (stage, signal, function whose k-th call is followed by the signal, k, where it stops, extra overrides)
SIGNALLED = [
    ("transformer", "SIGTERM", "transformer.trainer:Trainer.step", 3,
     "transformer: stopped by SIGTERM at step 3;", []),
    ("sae", "SIGTERM", "autoencoder.trainer:Trainer.step", 5,
     f"sae {NAME}: stopped by SIGTERM at step 6;", []),  # seen at the next step's all-reduce
    ("activations", "SIGTERM", "autoencoder.scatter:forward", 1,
     "activations train: stopped by SIGTERM at batch 1 of 3 (pass 1);", []),
    ("activations", "SIGINT", "autoencoder.in_ram:_Part.sha256", 1,  # in RAM (the world's size)
     "activations train: stopped by SIGINT at shard 0 of 3 (pass 2);", []),
    ("activations", "SIGINT", "autoencoder.shard_write:write_shard", 1,  # two passes: the same bytes
     "activations train: stopped by SIGINT at shard 1 of 3 (pass 2);", ["activations.in_ram_gb=0"]),
    ("features", "SIGTERM", "tools.features.scan:ScanState.update", 2,
     "features: stopped by SIGTERM at context", ["features.unit=neuron", "features.batch_tokens=64"]),
]


@pytest.mark.parametrize("stage,signame,target,k,line,extra", SIGNALLED,
                         ids=[f"{c[0]}-{c[1]}-{c[2].split(':')[1]}" for c in SIGNALLED])
def test_signalled_stage_stops_then_reruns_to_the_same_bytes(world, stage, signame, target, k, line, extra,
                                                             one_thread):
    module, out = STAGES[stage]
    stage_mod = importlib.import_module(module)
    folder = world.root / out
    if stage == "features":  # another output folder: its own uninterrupted reference
        stage_mod.run(world.cfg(*extra))
        folder = world.root / "run/features/neurons"
        ref = read_tree(folder)
    else:
        ref = world.ref[stage]
    shutil.rmtree(folder)
    r = run_cli([str(FAULT_RUNNER), signame, target, str(k), module, *world.overrides,
                 *extra])
    assert r.returncode == 128 + getattr(signal, signame), (stage, r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(line) and "run the same command again" in last, last
    assert not guard.lock_path(folder).exists()
    if stage == "transformer":  # the resume state is at the signalled step, not the last periodic one
        assert json.loads((folder / "checkpoint/state.json").read_text())["step"] == 3
    if stage == "sae":
        assert json.loads((folder / "checkpoint/state.json").read_text())["step"] == 6
    stage_mod.run(world.cfg(*extra))
    got = read_tree(folder)
    assert sorted(got) == sorted(ref), (stage, sorted(got))
    for rel, data in ref.items():
        assert got[rel] == data, (stage, rel)


def flip(path: Path, at: int | None = None) -> int:
    """XOR one byte (default: 3/4 into the file, past any header); returns its offset."""
    at = path.stat().st_size * 3 // 4 if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))
    return at


@pytest.fixture
def flipped(world):
    """flipped(path) corrupts a byte of a world file and restores it after the test."""
    done: list[tuple[Path, int]] = []

    def do(path: Path) -> Path:
        done.append((path, flip(path)))
        return path

    yield do
    for path, at in done:
        flip(path, at)


def test_flipped_token_file_is_refused(world, flipped):
    bad = flipped(world.root / "data/local/train.bin")
    with pytest.raises(UserError, match=f"token file {bad}: sha256"):
        importlib.import_module("transformer.train").run(world.cfg())


def test_flipped_shard_is_never_trained_on(world, flipped):
    bad = flipped(world.root / "run/activations/train/shard_00001.npy")
    with pytest.raises(UserError, match=f"shard {bad}: sha256.*nothing was trained on it"):
        importlib.import_module("autoencoder.train").run(world.cfg("sae.name=other", "sae.resample_steps=[]"))
    assert not (world.root / "run/sae/other/sae_weights.safetensors").exists()


def test_flipped_resample_set_is_refused(world, flipped):
    bad = flipped(world.root / "run/activations/train/resample.npy")
    with pytest.raises(UserError, match=f"resampling set {bad}: sha256"):
        importlib.import_module("autoencoder.train").run(world.cfg("sae.name=other2"))


def test_flipped_sae_weights_are_refused(world, flipped):
    bad = flipped(world.root / f"run/sae/{NAME}/sae_weights.safetensors")
    with pytest.raises(UserError, match=f"sae file {bad}: sha256"):
        importlib.import_module("tools.top_activations").run(world.cfg())


def test_flipped_checkpoints_are_refused(world, flipped):
    sae_train = importlib.import_module("autoencoder.train")
    sae_train.run(world.cfg("sae.name=ckpt", "sae.stop_at=8"))
    bad = flipped(world.root / "run/sae/ckpt/checkpoint/state.safetensors")
    with pytest.raises(UserError, match=f"SAE checkpoint file {bad}: sha256.*delete"):
        sae_train.run(world.cfg("sae.name=ckpt"))
    lm_train = importlib.import_module("transformer.train")
    lm_train.run(world.cfg(f"run_dir={world.root / 'lm2'}", "transformer.halt_at_step=2"))
    state = json.loads((world.root / "lm2/transformer/checkpoint/state.json").read_text())
    bad = flipped(world.root / "lm2/transformer/checkpoint" / state["tensors"])
    with pytest.raises(UserError, match=f"transformer checkpoint file {bad}: sha256"):
        lm_train.run(world.cfg(f"run_dir={world.root / 'lm2'}"))


def test_flipped_features_are_refused(world, flipped):
    bad = flipped(world.root / f"run/features/{NAME}/features.jsonl")
    with pytest.raises(UserError, match=f"features file {bad}: sha256"):
        importlib.import_module("tools.describe.stage").run(world.cfg())


def test_second_writer_refuses_naming_the_holder(world):
    with guard.output_lock(world.root / "run/sae/busy", "test holder"):
        r = run_cli(["-m", "autoencoder.train", *world.overrides, "sae.name=busy"])
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert f"is being written by test holder (pid {os.getpid()}" in line, r.stderr


def test_two_trainers_one_name_one_result(world):
    """Same sae.name, different l1_coeff, started together. Whichever order they
    run in, exactly one succeeds and the other refuses (the lock, or the overwrite rule)."""
    args = [sys.executable, "-m", "autoencoder.train", *world.overrides, "sae.name=race", "sae.steps=8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*args, f"sae.l1_coeff={c}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in (0.001, 0.002)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-1500:] for o in outs]
    loser = outs[[p.returncode for p in procs].index(2)][1].strip().splitlines()[-1]
    assert "being written by" in loser or "overwrite=true" in loser, loser
    winner = [0.001, 0.002][[p.returncode for p in procs].index(0)]
    meta = json.loads((world.root / "run/sae/race/cfg.json").read_text())
    assert meta["training"]["config"]["l1_coeff"] == winner


def test_changed_sae_is_not_overwritten_or_described_unseen(world):
    sae_dir = world.root / f"run/sae/{NAME}"
    backup = world.root / "sae-backup"
    shutil.copytree(sae_dir, backup)
    try:
        sae_train = importlib.import_module("autoencoder.train")
        with pytest.raises(UserError, match=f"{sae_dir} holds a finished SAE .*overwrite=true.*sae.name"):
            sae_train.run(world.cfg("sae.n_features=32"))
        sae_train.run(world.cfg("sae.n_features=32", "overwrite=true"))
        with pytest.raises(UserError, match=r"was made from sae .*sae_weights.safetensors .*changed since.*"
                                            r"tools.top_activations overwrite=true"):
            importlib.import_module("tools.describe.stage").run(world.cfg())
    finally:
        shutil.rmtree(sae_dir)
        shutil.move(backup, sae_dir)
