"""transformer.train: learning, exact resume, DDP equivalence, W&B read-back, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT
from tests.helpers.wandb_readback import read_offline_run
from tools.core.config import UserError, compose
from transformer import train
from transformer.model import load_model

V = 64  # a tiny vocabulary keeps these runs to seconds
TINY = ["transformer.vocab_size=64", "transformer.n_embd=32", "transformer.n_head=2",
        "transformer.block_size=32", "transformer.batch_size=4", "transformer.eval_batches=2",
        "transformer.warmup_steps=2", "transformer.lr=1e-2", "transformer.min_lr=1e-3",
        "transformer.log_interval=2", "transformer.threads=1", "device=cpu"]


def markov_tokens(n: int, seed: int) -> np.ndarray:
    """A 90%-deterministic bigram chain: learnable well below its unigram entropy (~ln 64)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.uint16)
    t = 0
    noise = rng.random(n) < 0.1
    rand = rng.integers(0, V, n)
    for i in range(n):
        t = rand[i] if noise[i] else (t * 7 + 3) % V
        out[i] = t
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    folder = root / "shakespeare"  # the default data.name
    folder.mkdir()
    tr, va = markov_tokens(20000, 0), markov_tokens(3000, 1)
    tr.tofile(folder / "train.bin")
    va.tofile(folder / "val.bin")
    p = np.bincount(tr, minlength=V) / len(tr)
    p = p[p > 0]
    meta = {"format": "monosemantic.tokens/1", "tokenizer": "synthetic", "vocab_size": V, "eot_id": V - 1,
            "dtype": "uint16", "tokens": {"train": len(tr), "val": len(va)},
            "documents": {"train": 1, "val": 1},
            "source": "markov test chain", "replaced_bytes": 0,
            "unigram_entropy_nats": float(-(p * np.log(p)).sum()), "config_hash": "test"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture()
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def cfg(data_dir: Path, run_dir: Path, *extra: str):
    return compose([f"data_dir={data_dir}", f"run_dir={run_dir}", *TINY, *extra])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "transformer" / "model.safetensors"))


def test_tiny_run_learns_and_writes_model(data_dir, tmp_path, no_wandb):
    c = cfg(data_dir, tmp_path / "run", "transformer.max_steps=40", "transformer.eval_interval=5")
    out = train.run(c)
    meta = json.loads((data_dir / "shakespeare" / "meta.json").read_text())
    assert out["steps"] == 40 and out["tokens_per_s"] > 0 and out["complete"]
    assert out["unigram_entropy_nats"] == pytest.approx(meta["unigram_entropy_nats"])
    assert out["val_loss"] < out["unigram_entropy_nats"] - 1.0  # learned the bigram structure
    conf = json.loads((tmp_path / "run" / "transformer" / "config.json").read_text())
    assert conf["tokens"] == meta and conf["val_loss"] == pytest.approx(out["val_loss"])
    assert conf["train"]["max_steps"] == 40 and conf["model"]["n_embd"] == 32
    model = load_model(tmp_path / "run" / "transformer")
    assert model.config.vocab_size == 64
    assert train.done(c)
    assert not train.done(cfg(data_dir, tmp_path / "run", "transformer.max_steps=40", "transformer.lr=2e-2"))


def test_killed_and_resumed_equals_uninterrupted(data_dir, tmp_path, no_wandb):
    common = ["transformer.max_steps=9", "transformer.eval_interval=4", "transformer.checkpoint_interval=2",
              "transformer.dropout=0.1", "transformer.grad_accum=2"]
    whole = train.run(cfg(data_dir, tmp_path / "a", *common))
    first = train.run(cfg(data_dir, tmp_path / "b", *common, "transformer.halt_at_step=5"))
    assert first["steps"] == 5 and not first["complete"]
    assert not (tmp_path / "b" / "transformer" / "model.safetensors").exists()
    ck = tmp_path / "b" / "transformer" / "checkpoint"
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 5
    assert sorted(p.name for p in ck.iterdir()) == ["state.json", "step_00000005.safetensors"]
    tensors = load_file(str(ck / state["tensors"]))
    assert tensors["rng.cpu"].dtype == torch.uint8 and any(k.endswith("exp_avg_sq") for k in tensors)
    rest = train.run(cfg(data_dir, tmp_path / "b", *common))
    assert rest["steps"] == 9
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert rest["val_loss"] == whole["val_loss"]


def test_checkpoint_from_another_model_config_is_refused(data_dir, tmp_path, no_wandb):
    train.run(cfg(data_dir, tmp_path / "r", "transformer.max_steps=3", "transformer.halt_at_step=2"))
    with pytest.raises(UserError, match=r"checkpoint .* different model config .*n_embd"):
        train.run(cfg(data_dir, tmp_path / "r", "transformer.max_steps=3", "transformer.n_embd=64"))
    # resume=false starts over instead
    out = train.run(cfg(data_dir, tmp_path / "r", "transformer.max_steps=3", "transformer.n_embd=64",
                        "transformer.resume=false"))
    assert out["steps"] == 3


@pytest.mark.parametrize("extra, message", [
    (["transformer.block_size=30000", "transformer.batch_size=1"], r"block_size`=30000 is longer than the"),
    (["transformer.block_size=4000", "transformer.batch_size=1"], r"val.bin holds 3000 tokens, shorter than"),
    (["transformer.tokens_per_step=100"], "tokens_per_step`=100 is not a multiple"),
    (["+transformer.bogus=1"], "transformer.bogus"),
    (["transformer.dtype=float8"], "transformer.dtype"),
    (["transformer.n_head=3"], "divisible by n_head"),
    (["transformer.vocab_size=32"], "smaller than the tokenizer's 64"),
])
def test_bad_inputs(data_dir, tmp_path, no_wandb, extra, message):
    with pytest.raises(UserError, match=message):
        train.run(cfg(data_dir, tmp_path / "r", "transformer.max_steps=2", *extra))
    assert not (tmp_path / "r" / "transformer" / "model.safetensors").exists()


def test_missing_tokens_name_the_file(tmp_path, no_wandb):
    with pytest.raises(UserError, match=r"meta.json"):
        train.run(cfg(tmp_path / "nothing", tmp_path / "r", "transformer.max_steps=2"))


def test_wandb_offline_run_has_the_logged_metrics(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = train.run(cfg(data_dir, tmp_path / "r", "transformer.max_steps=6", "transformer.eval_interval=3"))
    run = read_offline_run(tmp_path / "r")
    train_loss = run.series("train/loss")
    assert [s for s, _ in train_loss] == [2, 4, 6]
    assert train_loss[-1][1] == pytest.approx(out["train_loss"])
    assert [s for s, _ in run.series("val/loss")] == [3, 6]
    assert run.series("val/loss")[-1][1] == pytest.approx(out["val_loss"])
    lrs = [v for _, v in run.series("train/lr")]
    assert lrs[0] > lrs[-1] > 0  # cosine decay after warmup
    assert all(v > 0 for _, v in run.series("perf/tokens_per_s"))
    assert all(0 < v < 10 for _, v in run.series("perf/mfu"))
    assert run.summary["final/val_loss"] == pytest.approx(out["val_loss"])
    assert run.config["transformer"]["max_steps"] == 6


def test_ddp_two_gloo_processes_match_one_process(data_dir, tmp_path):
    common = [f"data_dir={data_dir}", *TINY, "transformer.max_steps=4", "transformer.eval_interval=4",
              "transformer.batch_size=2"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "transformer.train",
                        f"run_dir={tmp_path / 'ddp'}", *common, "transformer.grad_accum=1"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    single = train.run(compose([f"run_dir={tmp_path / 'one'}", *common, "transformer.grad_accum=2"]))
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ddp_conf = json.loads((tmp_path / "ddp" / "transformer" / "config.json").read_text())
    assert ddp_conf["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    # SIGTERM reaching rank 1 only: both ranks stop at step 1 (rank 0 writes the checkpoint), the
    # rerun ends with the uninterrupted run's weights
    script = tmp_path / "preempted.py"
    script.write_text("import json, os, signal, sys\n"
                      "from tools.core import preempt\n"
                      "from tools.core.config import compose\n"
                      "from transformer import train\n"
                      "with preempt.handlers():\n"
                      "    if os.environ['RANK'] == '1':\n"
                      "        signal.raise_signal(signal.SIGTERM)\n"
                      "    try:\n"
                      "        train.run(compose(sys.argv[1:]))\n"
                      "    except preempt.Preempted as e:\n"
                      "        print('LINE', e.line(), flush=True)\n")
    args = [f"run_dir={tmp_path / 'ddp2'}", *common, "transformer.grad_accum=1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    root = str(ROOT)
    r = subprocess.run([*torchrun, str(script), *args], env={**env, "PYTHONPATH": root}, capture_output=True,
                       text=True, timeout=240)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("LINE")]
    assert r.returncode == 0 and len(lines) == 2, r.stdout[-2000:] + r.stderr[-3000:]
    want = "transformer: stopped by SIGTERM at step 1; resume state saved in"
    assert all(want in ln for ln in lines), lines
    state = json.loads((tmp_path / "ddp2" / "transformer" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    r = subprocess.run([*torchrun, "-m", "transformer.train", *args], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    c = weights(tmp_path / "ddp2")
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(data_dir, tmp_path, no_wandb):
    import signal
    import time

    common = [f"data_dir={data_dir}", *TINY, "transformer.max_steps=150", "transformer.eval_interval=1000",
              "transformer.checkpoint_interval=1", "transformer.dropout=0.1"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "transformer.train", f"run_dir={killed}", *common],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "transformer" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert 3 <= step < 150, "the run should be killed part-way"
    assert not (killed / "transformer" / "model.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "transformer.train", f"run_dir={killed}", *common], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {killed / 'transformer' / 'checkpoint'} at step" in r.stdout
    train.run(compose([f"run_dir={tmp_path / 'whole'}", *common]))
    a, b = weights(killed), weights(tmp_path / "whole")
    for k in a:
        assert torch.equal(a[k], b[k]), k
