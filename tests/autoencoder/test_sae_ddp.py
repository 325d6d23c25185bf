"""DDP: two gloo ranks under torchrun take the same steps as one process on the whole batch, and
the trainer runs, checkpoints and resumes exactly under torchrun, and SIGTERM on one rank stops
both at the same step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from autoencoder.config import SAETrainConfig
from autoencoder.saes import SAEModelConfig, build_sae
from autoencoder.shard_write import write_shards
from autoencoder.step import make_optimizer, make_step
from tests.helpers import ROOT

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from autoencoder.saes import SAEModelConfig, build_sae
    from autoencoder.config import SAETrainConfig
    from autoencoder.step import make_optimizer, make_step
    import autoencoder.train as train
    from tools.core.config import compose

    out, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    for arch, k in (("standard", None), ("topk", 3)):
        torch.manual_seed(0)
        sae = build_sae(SAEModelConfig(arch, 8, 32, k=k))
        cfg = SAETrainConfig(lr=1e-2, kernel="dense", l1_coeff=0.1)
        step = make_step(sae, make_optimizer(sae, cfg), cfg, world_size=w)
        dead = torch.arange(32) < 10
        n = 64 // w
        for _ in range(5):
            step(x[r * n:(r + 1) * n], dead_mask=dead if k else None)
        state = {k_: v.detach() for k_, v in sae.state_dict().items()}
        save_file(state, str(out / f"{arch}_rank{r}.safetensors"))

    common = [f"run_dir={run_dir}", "wandb.mode=disabled", "device=cpu", "data_dir=/nonexistent",
              "sae.n_features=32", "sae.batch_size=64", "sae.steps=60", "sae.lr=3e-3", "sae.kernel=dense",
              "sae.resample_steps=[40]", "sae.dead_tokens=640", "sae.l1_coeff=0.3", "sae.log_every=10"]
    s = train.run(compose(common + ["sae.name=straight"]))
    train.run(compose(common + ["sae.name=resumed", "sae.stop_at=25"]))
    s2 = train.run(compose(common + ["sae.name=resumed"]))
    (out / f"summary_rank{r}.json").write_text(json.dumps([s, s2]))

    import signal
    from tools.core import preempt
    with preempt.handlers():  # SIGTERM reaches rank 1 only: both ranks stop at the same step
        if r == 1:
            signal.raise_signal(signal.SIGTERM)
        try:
            train.run(compose(common + ["sae.name=preempted"]))
            where = None
        except preempt.Preempted as e:
            where = e.line()
    train.run(compose(common + ["sae.name=preempted"]))
    (out / f"preempted_rank{r}.json").write_text(json.dumps(where))
    dist.destroy_process_group()
''')


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_gloo_ranks_equal_one_process(tmp_path):
    run_dir = tmp_path / "run"
    rows = np.random.default_rng(0).standard_normal((4096, 8)).astype(np.float16)
    write_shards(run_dir / "activations/train", np.abs(rows), 1024, resample_rows=512)
    (tmp_path / "ddp.py").write_text(SCRIPT)
    root = str(ROOT)  # this checkout, not site-packages
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "ddp.py"), str(tmp_path), str(run_dir)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    for arch, k in (("standard", None), ("topk", 3)):
        torch.manual_seed(0)
        sae = build_sae(SAEModelConfig(arch, 8, 32, k=k))
        cfg = SAETrainConfig(lr=1e-2, kernel="dense", l1_coeff=0.1)
        step = make_step(sae, make_optimizer(sae, cfg), cfg)
        for _ in range(5):
            step(x, dead_mask=(torch.arange(32) < 10) if k else None)
        for r in (0, 1):
            got = load_file(str(tmp_path / f"{arch}_rank{r}.safetensors"))
            for name, p in sae.state_dict().items():
                assert torch.allclose(got[name], p, atol=1e-5), (arch, r, name)

    s0 = json.loads((tmp_path / "summary_rank0.json").read_text())
    s1 = json.loads((tmp_path / "summary_rank1.json").read_text())
    assert s0[0]["l0"] == s1[0]["l0"]  # every rank returns the same summary
    meta = json.loads((run_dir / "sae/straight/cfg.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["steps"] == 60
    a = load_file(str(run_dir / "sae/straight/sae_weights.safetensors"))
    b = load_file(str(run_dir / "sae/resumed/sae_weights.safetensors"))
    for name in a:  # resume under DDP is exact too
        assert torch.equal(a[name], b[name]), name
    for r in (0, 1):
        line = json.loads((tmp_path / f"preempted_rank{r}.json").read_text())
        assert line.startswith("sae preempted: stopped by SIGTERM at step 1; resume state saved in "), line
    c = load_file(str(run_dir / "sae/preempted/sae_weights.safetensors"))
    for name in a:  # and so is the rerun after SIGTERM
        assert torch.equal(a[name], c[name]), name
