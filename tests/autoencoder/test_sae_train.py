"""The SAE trainer end to end on small synthetic shards: recovery, resume, bad input, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from autoencoder import train
from autoencoder.config import SAETrainConfig
from autoencoder.sae import load_sae
from autoencoder.shard_write import write_shards
from autoencoder.synthetic import ground_truth, mean_max_cosine, sparse_rows
from tools.core.config import UserError, compose

D, N_TRUE = 16, 32


@pytest.fixture(autouse=True)
def no_wandb_one_thread(monkeypatch):
    """conftest defaults WANDB_MODE=offline (which wins over the config); these runs need no W&B.
    One intra-op thread: these tensors are tiny, and on a busy machine a 2-thread pool makes each
    step ~40x slower (measured: 27 ms vs 0.7 ms)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Shards of sparse combinations of 32 known directions in 16 dimensions."""
    root = tmp_path_factory.mktemp("planted")
    g = torch.Generator().manual_seed(0)
    feats = ground_truth(N_TRUE, D, g)
    x = sparse_rows(feats, 24000, 0.05, g).numpy().astype(np.float16)
    write_shards(root / "activations/train", x[:20000], 5000, resample_rows=2048)
    write_shards(root / "activations/val", x[20000:], 4000, split="val", resample_rows=0)
    return root, feats


def cfg_for(run_dir: Path, *extra: str):
    return compose([f"run_dir={run_dir}", "wandb.mode=disabled", "device=cpu", "data_dir=/nonexistent",
                    "sae.n_features=64", "sae.batch_size=128", "sae.lr=3e-3", "sae.lr_warmup_steps=20",
                    "sae.log_every=50", "sae.kernel=dense", *extra])


def clone_run(src: Path, dst: Path) -> Path:
    """A run folder sharing the planted shards (symlinked) but with its own sae/ output."""
    (dst / "activations").mkdir(parents=True)
    for split in ("train", "val"):
        (dst / "activations" / split).symlink_to(src / "activations" / split)
    return dst


@pytest.mark.parametrize("arch,extra", [
    ("l1", ["sae.l1_coeff=0.6", "sae.resample_steps=[200,500]", "sae.dead_tokens=12800"]),
    ("topk", ["sae.k=2", "sae.dead_tokens=6400"]),
])
def test_recovers_planted_features_and_writes_artifacts(planted, tmp_path, arch, extra, capsys):
    src, feats = planted
    run_dir = clone_run(src, tmp_path / "run")
    cfg = cfg_for(run_dir, f"sae={arch}", "sae.steps=1200", "sae.eval_every=600", *extra)
    assert not train.done(cfg)
    s = train.run(cfg)
    out = capsys.readouterr().out
    assert f"sae {s['name']}: L0" in out and "loss recovered n/a" in out
    assert {"name", "l0", "explained_variance", "dead_fraction", "dense_fraction", "loss_recovered",
            "mse"} <= set(s)
    sae_dir = run_dir / "sae" / s["name"]
    assert s["name"] == ("l1-64-l1c6e-1" if arch == "l1" else "topk-64-k2")
    sae = load_sae(sae_dir)
    assert mean_max_cosine(feats, sae.W_dec) > 0.9
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert s["explained_variance"] > 0.6 and 1.0 <= s["l0"] <= 8.0 and s["dense_fraction"] < 0.2
    meta = json.loads((sae_dir / "cfg.json").read_text())
    assert meta["metrics"]["metrics/l0"] == pytest.approx(s["l0"])
    assert meta["training"]["steps"] == 1200 and meta["training"]["eval_source"].endswith("val")
    if arch == "l1":
        assert [r["step"] for r in meta["training"]["resampled"]] == [200, 500]
    sp = load_file(str(sae_dir / "sparsity.safetensors"))["sparsity"]
    assert sp.shape == (64,) and (sp <= 0).all()
    assert (sae_dir / "density_histogram.png").stat().st_size > 1000
    assert not (sae_dir / "checkpoint").exists()
    assert train.done(cfg)
    assert train.run(cfg)["l0"] == pytest.approx(s["l0"])  # finished: reported, not retrained
    assert not train.done(cfg_for(run_dir, f"sae={arch}", "sae.steps=1201", *extra))


RESUME = ["sae.steps=120", "sae.l1_coeff=0.3", "sae.resample_steps=[80]", "sae.dead_tokens=3840",
          "sae.lr_schedule=cosine", "sae.l1_warmup_steps=50", "sae.checkpoint_every=1000", "sae.name=r"]


def test_exact_resume(planted, tmp_path):
    src, _ = planted
    straight = clone_run(src, tmp_path / "a")
    train.run(cfg_for(straight, *RESUME))
    broken = clone_run(src, tmp_path / "b")
    s = train.run(cfg_for(broken, *RESUME, "sae.stop_at=45"))
    assert s["stopped_at"] == 45
    state = json.loads((broken / "sae/r/checkpoint/state.json").read_text())
    assert state["step"] == 45
    assert "last_fired" in load_file(str(broken / "sae/r/checkpoint/state.safetensors"))
    train.run(cfg_for(broken, *RESUME))
    wa = load_file(str(straight / "sae/r/sae_weights.safetensors"))
    wb = load_file(str(broken / "sae/r/sae_weights.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma = json.loads((straight / "sae/r/cfg.json").read_text())
    mb = json.loads((broken / "sae/r/cfg.json").read_text())
    assert ma["training"]["resampled"] == mb["training"]["resampled"]
    assert ma["metrics"] == mb["metrics"]


def test_resume_under_another_config_is_an_error(planted, tmp_path):
    run_dir = clone_run(planted[0], tmp_path / "run")
    train.run(cfg_for(run_dir, *RESUME, "sae.stop_at=10"))
    with pytest.raises(UserError, match=r"another config \(l1_coeff: 0\.3 -> 0\.5"):
        train.run(cfg_for(run_dir, *RESUME, "sae.l1_coeff=0.5"))


def test_wrong_d_in_and_bad_k_are_errors(planted, tmp_path):
    run_dir = clone_run(planted[0], tmp_path / "run")
    with pytest.raises(UserError, match="sae.d_in.*d_in=16"):
        train.run(cfg_for(run_dir, "sae.d_in=512", "sae.steps=5"))
    with pytest.raises(UserError, match="sae.k"):
        train.run(cfg_for(run_dir, "sae=topk", "sae.k=65", "sae.steps=5"))
    with pytest.raises(UserError, match="sae.mse_reduction"):
        train.run(cfg_for(run_dir, "sae.mse_reduction=median"))
    with pytest.raises(UserError, match="n_featurs"):
        train.run(cfg_for(run_dir, "+sae.n_featurs=3"))


def test_empty_resample_set_is_an_error(tmp_path):
    x = np.random.default_rng(0).random((512, D)).astype(np.float16)
    write_shards(tmp_path / "activations/train", x, 256, resample_rows=0)
    with pytest.raises(UserError, match="resampling subset not found|empty"):
        train.run(cfg_for(tmp_path, "sae.steps=50", "sae.resample_steps=[10]"))


def test_nan_stops_with_step_and_last_checkpoint(planted, tmp_path, monkeypatch):
    from autoencoder import shard_reader

    run_dir = clone_run(planted[0], tmp_path / "run")
    real_iter = shard_reader.ShardReader.__iter__

    def poisoned(self):
        for i, batch in enumerate(real_iter(self)):
            if self.directory.name == "train" and i == 12 and batch.shape[0] == 128:
                batch = batch.clone()
                batch[3, 2] = float("nan")
            yield batch

    monkeypatch.setattr(shard_reader.ShardReader, "__iter__", poisoned)
    with pytest.raises(UserError, match=r"input batch at step 13 .*checkpoint/state.json \(step 10\)"):
        train.run(cfg_for(run_dir, "sae.steps=40", "sae.checkpoint_every=5", "sae.b_dec_init=zeros",
                          "sae.name=n"))
    assert not (run_dir / "sae/n/sae_weights.safetensors").exists()
    state = load_file(str(run_dir / "sae/n/checkpoint/state.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("sae."))


def test_sweep_names_do_not_collide():
    base = SAETrainConfig(l1_coeff=3e-4)
    assert train.sae_name(base) == "l1-4096-l1c3e-4"
    swept = SAETrainConfig(l1_coeff=1.5e-3, lr=3e-4)
    assert train.sae_name(swept, ["sae.l1_coeff=1.5e-3", "sae.lr=3e-4"]) == "l1-4096-l1c1.5e-3-lr3e-4"
    assert train.sae_name(SAETrainConfig(architecture="topk", k=16)) == "topk-4096-k16"
    assert train.sae_name(SAETrainConfig(name="mine")) == "mine"
    no_rs = SAETrainConfig(l1_coeff=0.1, resample_steps=[])
    assert train.sae_name(no_rs, ["sae.resample_steps=[]"]) == "l1-4096-l1c1e-1-resamplesteps0"


def test_loss_recovered_on_tiny_model_matches_direct_computation(tmp_path):
    import torch.nn.functional as F

    from transformer.model import GPT, GPTConfig, save_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():  # make the MLP matter, so the three losses are well apart
        model.transformer.h[0].mlp.c_proj.weight.mul_(40)
        model.lm_head.weight.mul_(10)
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    save_model(model, run_dir / "transformer")
    n_ctx, span = 6, 17
    val = np.random.default_rng(1).integers(0, 64, n_ctx * span).astype(np.uint16)
    (data_dir / "shakespeare").mkdir(parents=True)
    val.tofile(data_dir / "shakespeare" / "val.bin")
    train_tok = torch.from_numpy(np.random.default_rng(2).integers(0, 64, (256, 16)))
    acts = model.mlp_acts(train_tok).reshape(-1, 64).numpy().astype(np.float16)
    write_shards(run_dir / "activations/train", acts, 2048, resample_rows=0)

    cfg = compose([f"run_dir={run_dir}", f"data_dir={data_dir}", "wandb.mode=disabled", "device=cpu",
                   "sae.n_features=128", "sae.batch_size=256", "sae.steps=150", "sae.lr=3e-3",
                   "sae.resample_steps=[]", "sae.l1_coeff=1e-3", f"sae.eval_contexts={n_ctx}",
                   "sae.kernel=dense"])
    s = train.run(cfg)
    sae = load_sae(run_dir / "sae" / s["name"])
    ctx = torch.from_numpy(val.astype(np.int64)).view(n_ctx, span)
    idx, tgt = ctx[:, :-1], ctx[:, 1:]

    @torch.no_grad()
    def nll(edit):
        logits, _ = model(idx, mlp_edit=edit)
        return float(F.cross_entropy(logits.reshape(-1, 64), tgt.reshape(-1)))

    l_orig = nll(None)
    l_recon = nll(lambda i, h: sae(h))
    l_zero = nll(lambda i, h: torch.zeros_like(h))
    assert l_zero - l_orig > 0.05  # a meaningful denominator
    assert s["nll_original"] == pytest.approx(l_orig, rel=1e-5)
    assert s["nll_reconstructed"] == pytest.approx(l_recon, rel=1e-5)
    assert s["nll_zero_ablation"] == pytest.approx(l_zero, rel=1e-5)
    assert s["loss_recovered"] == pytest.approx((l_zero - l_recon) / (l_zero - l_orig), rel=1e-4)
    assert 0.0 < s["loss_recovered"] <= 1.05
    meta = json.loads((run_dir / "sae" / s["name"] / "cfg.json").read_text())
    assert meta["training"]["eval_source"].endswith("contexts")  # no val shards: rows from val contexts
    assert meta["metrics"]["metrics/loss_recovered"] == pytest.approx(s["loss_recovered"])


def test_cli_multirun_sweep_and_bad_input_exit_code(planted, tmp_path):
    import os
    import subprocess
    import sys

    run_dir = clone_run(planted[0], tmp_path / "run")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    common = [f"run_dir={run_dir}", "device=cpu", "data_dir=/nonexistent", "sae.n_features=64",
              "sae.batch_size=128", "sae.steps=20", "sae.kernel=dense", "sae.resample_steps=[]"]
    proc = subprocess.run([sys.executable, "-m", "autoencoder.train", "-m", "sae.l1_coeff=0.1,0.2",
                           "sae.lr=1e-3", *common], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "sae").iterdir()) == ["l1-64-l1c1e-1", "l1-64-l1c2e-1"]
    proc = subprocess.run([sys.executable, "-m", "autoencoder.train", "sae.d_in=3", *common],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "error: config `sae.d_in`=3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_offline_run_has_the_metrics(planted, tmp_path, monkeypatch):
    from tests.helpers.wandb_readback import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = clone_run(planted[0], tmp_path / "run")
    s = train.run(cfg_for(run_dir, "wandb.mode=offline", "sae.steps=100", "sae.eval_every=50",
                          "sae.log_every=10", "sae.resample_steps=[40]", "sae.dead_tokens=2560",
                          "sae.l1_coeff=0.3"))
    import time

    for _ in range(100):  # wandb-core may still be flushing the file after finish() returns
        run = read_offline_run(run_dir / "wandb")
        if "l0" in run.summary and len(run.series("losses/mse_loss")) == 10:
            break
        time.sleep(0.1)
    keys = {k for row in run.history for k in row}
    for key in ("losses/mse_loss", "losses/l1_loss", "losses/overall_loss", "metrics/l0",
                "metrics/explained_variance", "sparsity/dead_features", "sparsity/below_1e-5",
                "sparsity/below_1e-6", "metrics/mean_log10_feature_sparsity", "sparsity/dense_fraction",
                "eval/metrics/l0", "eval/metrics/explained_variance", "sparsity/resampled",
                "plots/log10_feature_density", "details/current_learning_rate"):
        assert key in keys, key
    assert [v for _, v in run.series("sparsity/resampled")] == [s["resampled"]]
    assert len(run.series("losses/mse_loss")) == 10
    assert run.series("eval/metrics/l0")[-1][1] == pytest.approx(s["l0"])
    hist = run.series("plots/log10_feature_density")[-1][1]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 64
    assert run.summary["l0"] == pytest.approx(s["l0"]) and run.config["sae"]["n_features"] == 64
