"""The top-activation pass against brute force on a tiny random GPT + SAE, and its bad-input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from autoencoder.sae import load_sae, save_sae
from autoencoder.saes import SAEModelConfig, build_sae
from tests.helpers.features import (
    DEAD,
    T,
    all_acts,
    check_against_brute_force,
    make_run,
    overrides,
    records,
)
from tools import top_activations as ta
from tools.core.config import UserError, compose
from tools.features import config as fconf
from tools.features import scan as fscan
from tools.features import select as fselect
from transformer.model import load_model

# features.negative_frac in the neuron test: a random GPT's neurons are unselective (on these random
# tokens no context stays below 0.1 x a neuron's max, ~12% stay below 0.5), so a higher threshold
# exercises the candidate top-up for most neurons
NEURON_FRAC = 0.5






@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return make_run(tmp_path_factory.mktemp("ta"))


@pytest.fixture(scope="module")
def sae_run(tiny):
    run_dir, data_dir = tiny
    cfg = compose(overrides(run_dir, data_dir))
    result = ta.run(cfg)
    return cfg, result








def test_sae_features_match_brute_force(tiny, sae_run):
    run_dir, data_dir = tiny
    cfg, result = sae_run
    assert result["name"] == "tiny_sae" and result["units"] == 64
    assert result["alive"] == 64 - len(DEAD)
    assert Path(result["site"]).is_file()
    f, toks = all_acts(run_dir, data_dir, "sae")
    recs = records(run_dir, "tiny_sae")
    meta = json.loads((run_dir / "features" / "tiny_sae" / "meta.json").read_text())
    cand = fscan.candidate_contexts(f.shape[0], meta["negative_candidates"], int(cfg.seed))
    check_against_brute_force(recs, f, toks, n_random=20, cand=cand)
    for u in (62, 63):
        assert recs[u]["density"] == 0 and recs[u]["top"] == [] and len(recs[u]["random"]) == 20
    assert meta["negative_frac"] == 0.1 and "never fires" in meta["negatives"]
    assert meta["unit"] == "sae" and meta["n_units"] == 64 and meta["tokens_scanned"] == f.shape[0] * T
    assert meta["sae_metrics"] == {"l0": 3.5, "explained_variance": 0.5}
    assert meta["bins"]["kind"] == "equal-width"
    assert sum(meta["density_log10_histogram"]["counts"]) == 64 - len(DEAD)


def test_contract_fields(tiny, sae_run):
    """The keys docs/formats.md pins (the describe stage reads them)."""
    rec = records(tiny[0], "tiny_sae")[0]
    assert set(rec) >= {"index", "density", "max_act", "mean_act", "hist", "logits", "top", "quantiles",
                        "random"}
    assert set(rec["hist"]) == {"edges", "counts"}
    assert len(rec["hist"]["edges"]) == len(rec["hist"]["counts"]) + 1
    assert {"id", "str", "value"} == set(rec["logits"]["pos"][0]) == set(rec["logits"]["neg"][0])
    assert len(rec["logits"]["pos"]) == len(rec["logits"]["neg"]) == 10
    assert set(rec["quantiles"][0]) >= {"lo", "hi", "examples"}
    assert set(rec["top"][0]) == {"ctx", "start", "pos", "max", "tokens", "strs", "acts"}


def test_logit_effects_match_brute_force(tiny, sae_run):
    run_dir, _ = tiny
    model = load_model(run_dir / "transformer")
    sae = load_sae(run_dir / "sae" / "tiny_sae")
    with torch.no_grad():
        full = (sae.W_dec @ model.transformer.h[0].mlp.c_proj.weight.t()) * model.transformer.ln_f.weight
        full = full @ model.lm_head.weight[:50257].t()
    for rec in records(run_dir, "tiny_sae")[:8]:
        row = full[rec["index"]]
        top = row.topk(10)
        bottom = row.topk(10, largest=False)
        assert [e["id"] for e in rec["logits"]["pos"]] == top.indices.tolist()
        assert [e["id"] for e in rec["logits"]["neg"]] == bottom.indices.tolist()
        assert [e["value"] for e in rec["logits"]["pos"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_neurons_match_brute_force(tiny, sae_run):
    run_dir, data_dir = tiny
    # fewer candidates than contexts, so the brute force checks the candidate sample is respected
    cfg = compose(overrides(run_dir, data_dir, "features.unit=neuron", "features.n_random=5",
                            "features.negative_candidates=30", f"features.negative_frac={NEURON_FRAC}"))
    assert fconf.unit_name(cfg) == "neurons"
    result = ta.run(cfg)
    assert result["name"] == "neurons" and result["units"] == 128
    f, toks = all_acts(run_dir, data_dir, "neuron")
    recs = records(run_dir, "neurons")
    assert [r["index"] for r in recs] == list(range(128))
    meta = json.loads((run_dir / "features" / "neurons" / "meta.json").read_text())
    assert meta["negative_frac"] == NEURON_FRAC and meta["negative_candidates"] == 30
    cand = fscan.candidate_contexts(f.shape[0], 30, int(cfg.seed))
    assert len(cand) == 30 and len(set(cand.tolist())) == 30
    # a subset keeps this quick; GELU neurons are almost never <= 0 over a whole context, so their
    # negatives are candidates under the threshold
    topped_up = check_against_brute_force(recs[:40], f[..., :40], toks, n_random=5, cand=cand,
                                           frac=NEURON_FRAC)
    assert topped_up > 0
    assert sum(len(r["random"]) > 0 for r in recs) > 64, "most neurons should get negatives"
    model = load_model(run_dir / "transformer")
    with torch.no_grad():
        w = model.transformer.h[0].mlp.c_proj.weight[:, 7] * model.transformer.ln_f.weight
        logits = model.lm_head.weight[:50257] @ w
    assert [e["id"] for e in recs[7]["logits"]["pos"]] == logits.topk(10).indices.tolist()


def test_done_tracks_config_and_inputs(tiny, sae_run):
    run_dir, data_dir = tiny
    cfg, _ = sae_run
    assert ta.done(cfg)
    assert not ta.done(compose(overrides(run_dir, data_dir, "features.top_k=5")))
    assert not ta.done(compose(overrides(run_dir, data_dir, "seed=7")))
    # a rerun of a finished config only rebuilds the site
    before = (run_dir / "features" / "tiny_sae" / "features.jsonl").stat().st_mtime_ns
    ta.run(cfg)
    assert (run_dir / "features" / "tiny_sae" / "features.jsonl").stat().st_mtime_ns == before


def _synthetic_scan(f: torch.Tensor, batch: int, **kw) -> fscan.ScanState:
    st = fscan.ScanState(f.shape[-1], kw.get("k", 4), kw.get("m", 5), kw.get("n_random", 3), "cpu", seed=0,
                      n_ctx=f.shape[0], candidates=kw.get("candidates", 8))
    for c0 in range(0, f.shape[0], batch):
        st.update(f[c0:c0 + batch], c0)
    return st


def test_state_is_exact_and_batch_invariant():
    """Counts, sums, max, top-k and the (re-binned) histogram do not depend on batching; the
    histogram equals numpy's over the final equal-width edges even as the range doubles."""
    g = torch.Generator().manual_seed(0)
    n_ctx, F = 40, 6
    f = torch.relu(torch.randn(n_ctx, 16, F, generator=g))
    f *= torch.exp2(torch.arange(n_ctx, dtype=torch.float32) / 4)[:, None, None]  # growing max: R doubles
    a, b = _synthetic_scan(f, 1), _synthetic_scan(f, n_ctx)
    for key in ("maxv", "scale", "hist", "top_v", "top_c", "top_p", "cand_ctx", "cand_max"):
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert torch.equal(a.count, (f > 0).sum((0, 1)))
    cmax, carg = f.max(1)
    # the candidate negatives' table: each sampled context's max per unit
    assert torch.equal(a.cand_ctx, torch.from_numpy(fscan.candidate_contexts(n_ctx, 8, 0)))
    assert torch.equal(a.cand_max, cmax[a.cand_ctx])
    assert torch.equal(a.top_p, carg.t().gather(1, a.top_c))  # where each top context's max is
    assert torch.allclose(a.total, b.total)
    for u in range(F):
        vals = f[..., u][f[..., u] > 0].numpy()
        R = float(a.scale[u])
        assert vals.max() <= R < 2 * vals.max()
        want = np.histogram(vals, bins=np.linspace(0, R, fconf.HIST_BINS + 1))[0]
        assert np.array_equal(a.hist[u].numpy(), want)


def test_state_size_does_not_grow_with_tokens():
    g = torch.Generator().manual_seed(1)
    small = _synthetic_scan(torch.relu(torch.randn(4, 16, 8, generator=g)), 2)
    large = _synthetic_scan(torch.relu(torch.randn(200, 16, 8, generator=g)), 2)
    size = lambda st: sum(t.numel() for t in st.tensors.values())  # noqa: E731
    assert size(small) == size(large)


def test_quantile_samples_are_uniform_within_bins():
    """Examples lie in their bins, and the per-bin token counts estimated from the samples match."""
    g = torch.Generator().manual_seed(2)
    n_ctx, F = 300, 2
    f = torch.relu(torch.randn(n_ctx, 32, F, generator=g)) ** 2  # skewed: most mass in low bins
    st = _synthetic_scan(f, 16, k=5, m=5)
    arrays = st.numpy()
    rng = np.random.default_rng(0)
    shown = possible = 0
    for u in range(F):
        fu = f[..., u]
        picks = fselect.quantile_picks(arrays, u, 10, 5, set(), rng)
        assert len(picks) == 10
        for lo, hi, est, chosen in picks:
            true = int(((fu > lo) & (fu <= hi + 1e-7)).sum())
            # a sparse bin may lose a token to a slot collision (two tokens, one slot)
            assert len(chosen) <= min(5, true)
            shown, possible = shown + len(chosen), possible + min(5, true)
            for c, p in chosen:
                assert lo < float(fu[c, p]) <= hi + 1e-6
            if true >= 50:
                assert abs(est - true) <= 0.15 * true, (lo, hi, est, true)
        # uniformity: across many draws, the lowest bin's picks have about the bin's mean value
        lo, hi = picks[0][0], picks[0][1]
        inbin = fu[(fu > lo) & (fu <= hi)]
        draws = [float(fu[c, p]) for _ in range(40)
                 for c, p in fselect.quantile_picks(arrays, u, 10, 5, set(), rng)[0][3]]
        assert abs(np.mean(draws) - inbin.mean().item()) < 0.2 * (hi - lo)
    assert shown >= 0.9 * possible, (shown, possible)


def test_bad_inputs_are_user_errors(tiny, tmp_path):
    run_dir, data_dir = tiny
    with pytest.raises(UserError, match="features.unit"):
        ta.run(compose(overrides(run_dir, data_dir, "features.unit=both")))
    with pytest.raises(UserError, match="test.bin"):
        ta.run(compose(overrides(run_dir, data_dir, "features.split=test")))
    with pytest.raises(UserError, match="features.pages"):
        ta.run(compose(overrides(run_dir, data_dir, "features.pages=[3,64]")))
    with pytest.raises(UserError, match="nope"):
        fconf.unit_name(compose(overrides(run_dir, data_dir, "features.sae=nope")))
    with pytest.raises(UserError, match="features"):
        ta.run(compose(overrides(run_dir, data_dir, "+features.topk=3")))
    # a second SAE: the name must be chosen; one with the wrong d_in is refused
    other = tmp_path / "run"
    make_run(tmp_path, n_features=8)
    wrong = build_sae(SAEModelConfig(architecture="standard", d_in=64, d_sae=8))
    save_sae(wrong, other / "sae" / "wrong_d_in")
    with pytest.raises(UserError, match="several SAEs.*tiny_sae.*wrong_d_in"):
        fconf.unit_name(compose(overrides(other, tmp_path / "data")))
    with pytest.raises(UserError, match="d_in=64"):
        ta.run(compose(overrides(other, tmp_path / "data", "features.sae=wrong_d_in")))
    empty = tmp_path / "empty"
    with pytest.raises(UserError, match="no SAE found"):
        fconf.unit_name(compose(overrides(empty, tmp_path / "data")))


def test_pages_subset_and_resumable_site(tmp_path):
    run_dir, data_dir = make_run(tmp_path, n_features=16)
    cfg = compose(overrides(run_dir, data_dir, "features.pages=[2,5,9]", "features.unit_chunk=5"))
    ta.run(cfg)
    site = run_dir / "features" / "tiny_sae" / "site"
    assert sorted(p.name for p in (site / "feature").iterdir()) == ["2.html", "5.html", "9.html"]
    # a site deleted after the scan is rebuilt without rescanning
    import shutil

    shutil.rmtree(site)
    assert not ta.done(cfg)
    before = (run_dir / "features" / "tiny_sae" / "features.jsonl").stat().st_mtime_ns
    ta.run(cfg)
    assert (site / "index.html").is_file() and ta.done(cfg)
    assert (run_dir / "features" / "tiny_sae" / "features.jsonl").stat().st_mtime_ns == before
    # other pages: no rescan, the site follows
    cfg2 = compose(overrides(run_dir, data_dir, "features.pages=[0]"))
    assert not ta.done(cfg2)
    ta.run(cfg2)
    assert ta.done(cfg2) and not ta.done(cfg)
    assert [p.name for p in (site / "feature").iterdir()] == ["0.html"]
    assert (run_dir / "features" / "tiny_sae" / "features.jsonl").stat().st_mtime_ns == before
    assert math.isfinite(json.loads((run_dir / "features" / "tiny_sae" / "meta.json").read_text())["alive"])


def test_top_up_negatives_leave_other_units_unchanged(tmp_path):
    """Without candidates, negatives are only never-firing contexts (the earlier rule); with them, a
    unit short of n_random gets extra negatives appended, and every other example stays the same."""
    run_dir, data_dir = make_run(tmp_path, n_features=16)
    ta.run(compose(overrides(run_dir, data_dir, "features.negative_candidates=0", "features.pages=[0]")))
    before = records(run_dir, "tiny_sae")
    ta.run(compose(overrides(run_dir, data_dir, "features.pages=[0]", "features.negative_frac=0.3",
                             "overwrite=true")))  # another config: replacing it needs overwrite=true
    after = records(run_dir, "tiny_sae")
    changed = 0
    for x, y in zip(before, after, strict=True):
        assert {k: v for k, v in x.items() if k != "random"} == {k: v for k, v in y.items() if k != "random"}
        assert y["random"][:len(x["random"])] == x["random"]
        changed += len(y["random"]) > len(x["random"])
        assert len(y["random"]) == 20 or len(x["random"]) < 20
    assert changed > 0


def test_uniform_windows_are_the_same_for_every_unit(sae_run, tiny):
    """`uniform`: n_uniform windows drawn uniformly from the scanned text, identical (ctx, start)
    for every unit, each with that unit's own activations (docs/formats.md)."""
    run_dir, data_dir = tiny
    recs = records(run_dir, "tiny_sae")
    f, _ = all_acts(run_dir, data_dir, "sae")
    where = [(e["ctx"], e["start"]) for e in recs[0]["uniform"]]
    assert len(where) == 10 and len({c for c, _ in where}) == 10
    for r in recs:
        assert [(e["ctx"], e["start"]) for e in r["uniform"]] == where
        for e in r["uniform"]:
            want = f[e["ctx"], e["start"]:e["start"] + len(e["acts"]), r["index"]]
            assert e["acts"] == pytest.approx(want.tolist(), abs=1e-4)
