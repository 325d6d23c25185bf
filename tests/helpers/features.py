"""A tiny random GPT + SAE run for the features stage, and its brute-force check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autoencoder.sae import load_sae, save_sae
from autoencoder.saes import SAEModelConfig, build_sae
from transformer.model import GPT, GPTConfig, load_model, save_model
from transformer.tokenizer import get_encoding

T = 64


HOSTILE = (
    '</script><script>window.__pwned=1</script> <img src=x onerror="window.__pwned=2"> '
    '"><svg onload="window.__pwned=3"> 日本語 🎉 zero\u200bwidth \u202eRTL override\u202c '
    + "x" * 400 + "\n\ttab & <b>bold</b>"
)


DEAD = (-2, -1)  # SAE features made dead in the fixture (the last two)


def make_run(root: Path, n_features: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random GPT, a val.bin of random tokens with the hostile text planted, a random SAE."""
    torch.manual_seed(seed)
    run_dir, data_dir = root / "run", root / "data"
    model = GPT(GPTConfig(block_size=T, n_embd=32, n_head=2, vocab_size=50304))
    save_model(model, run_dir / "transformer")
    enc = get_encoding()
    planted = enc.encode(HOSTILE) + [50256]
    rng = np.random.default_rng(seed)
    noise = lambda n: rng.integers(0, 50257, n)  # noqa: E731
    toks = np.concatenate([noise(T * 30), np.tile(planted, 4), noise(T * 20)])
    (data_dir / "tiny").mkdir(parents=True, exist_ok=True)
    toks.astype(np.uint16).tofile(data_dir / "tiny" / "val.bin")
    sae = build_sae(SAEModelConfig(architecture="standard", d_in=model.config.d_mlp, d_sae=n_features))
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
        sae.b_enc[list(DEAD)] = -100.0
    save_sae(sae, run_dir / "sae" / "tiny_sae", extra={"metrics": {"l0": 3.5, "explained_variance": 0.5}})
    return run_dir, data_dir


def overrides(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data_dir={data_dir}", "data.name=tiny", "device=cpu",
            "features.batch_tokens=640", "wandb.mode=disabled", *extra]


def records(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "features" / name / "features.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def all_acts(run_dir: Path, data_dir: Path, unit: str) -> tuple[torch.Tensor, np.ndarray]:
    model = load_model(run_dir / "transformer")
    toks = np.fromfile(data_dir / "tiny" / "val.bin", dtype=np.uint16).astype(np.int64)
    n = len(toks) // T
    x = model.mlp_acts(torch.from_numpy(toks[: n * T]).view(n, T), 0)
    if unit == "neuron":
        return x, toks
    with torch.no_grad():
        return load_sae(run_dir / "sae" / "tiny_sae").encode(x), toks


def check_against_brute_force(recs: list[dict], f: torch.Tensor, toks: np.ndarray, n_random: int,
                               cand: np.ndarray, frac: float = 0.1) -> int:
    n_ctx = f.shape[0]
    cand_set = set(cand.tolist())
    topped_up = 0
    shown = possible = 0
    for r in recs:
        u = r["index"]
        fu = f[..., u].double()
        firing = fu > 0
        assert r["density"] == pytest.approx(firing.double().mean().item(), abs=1e-12)
        assert r["max_act"] == pytest.approx(max(fu.max().item(), 0.0), abs=1e-5)
        if firing.any():
            assert r["mean_act"] == pytest.approx(fu[firing].mean().item(), rel=1e-4)
        assert sum(r["hist"]["counts"]) == int(firing.sum())
        # top-k: the k contexts with the largest max activation (as a multiset of values)
        cmax = fu.max(1).values
        want = sorted(cmax[cmax > 0].tolist(), reverse=True)[:20]
        got = sorted((cmax[e["ctx"]].item() for e in r["top"]), reverse=True)
        assert got == pytest.approx(want, abs=1e-5)
        assert len({e["ctx"] for e in r["top"]}) == len(r["top"])  # distinct contexts
        for e in r["top"]:
            assert e["acts"][e["pos"]] == pytest.approx(cmax[e["ctx"]].item(), abs=1e-4)
        examples = r["top"] + [e for q in r["quantiles"] for e in q["examples"]] + r["random"]
        for e in examples:
            c, s, n = e["ctx"], e["start"], len(e["tokens"])
            assert n == len(e["strs"]) == len(e["acts"]) == min(2 * 32 + 1, T)
            assert 0 <= s and s + n <= T
            assert e["tokens"] == toks[c * T + s: c * T + s + n].tolist()
            assert np.allclose(e["acts"], fu[c, s:s + n].numpy(), atol=2e-4)
            assert e["max"] == pytest.approx(max(e["acts"]), abs=1e-4)
        # negatives: max over the whole context <= frac x max_act; never-firing contexts come first
        # (sampled over the whole scan), then candidate contexts under the threshold
        thr = frac * max(fu.max().item(), 0.0)
        silent = cmax <= 0
        under = [c for c in cand_set if 0 < cmax[c] <= thr + 1e-6]
        n_silent = int(silent.sum())
        assert len(r["random"]) == min(n_random, n_silent + len(under))
        assert len({e["ctx"] for e in r["random"]}) == len(r["random"])
        assert sum(bool(silent[e["ctx"]]) for e in r["random"]) == min(n_random, n_silent)
        for e in r["random"]:
            assert cmax[e["ctx"]] <= thr + 1e-6
            assert silent[e["ctx"]] or e["ctx"] in cand_set
        topped_up += sum(not bool(silent[e["ctx"]]) for e in r["random"])
        # quantile bins: equal width over (0, max], each example's token inside its bin
        if r["max_act"] > 0:
            qs = r["quantiles"]
            assert len(qs) == 10
            assert qs[0]["lo"] == 0 and qs[-1]["hi"] == pytest.approx(r["max_act"], rel=1e-5)
            for q in qs:
                inbin = ((fu > q["lo"]) & (fu <= q["hi"] + 1e-6)).sum().item()
                # a histogram bin straddling a bin edge may hold only samples from its other side
                assert len(q["examples"]) <= min(5, inbin)
                shown, possible = shown + len(q["examples"]), possible + min(5, inbin)
                for e in q["examples"]:
                    assert q["lo"] - 1e-4 < e["acts"][e["pos"]] <= q["hi"] + 1e-4
        else:
            assert r["top"] == [] and r["quantiles"] == [] and r["hist"]["counts"] == []
    assert len(recs) == f.shape[-1] and [r["index"] for r in recs] == list(range(f.shape[-1]))
    assert n_ctx > 0 and shown >= 0.9 * possible, (shown, possible)
    return topped_up
