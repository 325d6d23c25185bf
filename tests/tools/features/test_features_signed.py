"""Signed units: a neuron's negative side (bottom-k by min, bins below 0, its own negatives) against
brute force, per-unit activation quantiles, and the site showing both sides and the layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.features import (
    all_acts,
    check_against_brute_force,
    make_run,
    overrides,
    records,
)
from tools import top_activations as ta
from tools.core.config import UserError, compose, section
from tools.features import config as fconf
from tools.features import scan as fscan

FRAC = 0.5


@pytest.fixture(scope="module")
def neuron_run(tmp_path_factory):
    run_dir, data_dir = make_run(tmp_path_factory.mktemp("signed"), n_features=8)
    cfg = compose(overrides(run_dir, data_dir, "features.unit=neuron", "features.n_random=5",
                            "features.negative_candidates=30", f"features.negative_frac={FRAC}",
                            "features.pages=[0,1,2]"))
    ta.run(cfg)
    return cfg, run_dir, data_dir


def _mirrored(r: dict) -> dict:
    """A neuron's negative side written as the positive side of the negated activations."""
    n = r["neg"]

    def ex(e: dict) -> dict:
        return {**e, "max": -e["min"], "acts": [-a for a in e["acts"]]}

    return {"index": r["index"], "density": n["density"], "max_act": -n["min_act"],
            "mean_act": -n["mean_act"], "hist": n["hist"], "top": [ex(e) for e in n["bottom"]],
            "quantiles": [{"lo": -q["hi"], "hi": -q["lo"], "count": q["count"],
                           "examples": [ex(e) for e in q["examples"]]} for q in reversed(n["quantiles"])],
            "random": [ex(e) for e in n["random"]]}


def test_negative_side_matches_brute_force(neuron_run):
    cfg, run_dir, data_dir = neuron_run
    f, toks = all_acts(run_dir, data_dir, "neuron")
    recs = records(run_dir, "neurons")
    assert all("neg" in r for r in recs)
    meta = json.loads((run_dir / "features" / "neurons" / "meta.json").read_text())
    assert meta["negative_side"] is True and meta["layer"] == 0
    r0 = recs[0]["neg"]
    assert r0["min_act"] < 0 and r0["mean_act"] < 0 and set(r0) >= {"bottom", "quantiles", "random", "hist"}
    assert all(e["min"] == min(e["acts"]) and e["acts"][e["pos"]] == e["min"] for e in r0["bottom"])
    assert all(q["lo"] < q["hi"] <= 0 for q in r0["quantiles"])
    # both sides are one two-sided state: the candidates come from the scan's seed
    cand = fscan.candidate_contexts(f.shape[0], 30, int(cfg.seed))
    check_against_brute_force([_mirrored(r) for r in recs[:40]], -f[..., :40], toks, n_random=5,
                               cand=cand, frac=FRAC)


def test_activation_quantiles_are_within_a_bin(neuron_run):
    cfg, run_dir, data_dir = neuron_run
    f, _ = all_acts(run_dir, data_dir, "neuron")
    probs = list(section(cfg, "features", fconf.FeaturesConfig).act_quantiles)
    flat = f.reshape(-1, f.shape[-1]).double()
    for r in records(run_dir, "neurons")[:32]:
        u = r["index"]
        x = flat[:, u].numpy()
        # the order statistics around each quantile (definitions differ in between them)
        lo, hi = np.quantile(x, probs, method="lower"), np.quantile(x, probs, method="higher")
        # histogram bins are R / 64 wide, R < 2 x the side's largest magnitude
        width = 2 * max(r["max_act"], -r["neg"]["min_act"]) / 64
        got = np.asarray(r["act_quantiles"], dtype=np.float64)
        assert np.all(np.diff(got) >= -1e-9)
        assert np.all((lo - width - 1e-6 <= got) & (got <= hi + width + 1e-6)), (u, got, lo, hi)


def test_sae_features_have_one_side_and_exact_zero_quantiles(tmp_path):
    run_dir, data_dir = make_run(tmp_path, n_features=8)
    ta.run(compose(overrides(run_dir, data_dir, "features.pages=[0]")))
    recs = records(run_dir, "tiny_sae")
    assert all("neg" not in r for r in recs)
    for r in recs:
        q = r["act_quantiles"]
        assert all(v is not None and v >= 0 for v in q)
        if r["density"] < 0.5:
            assert q[0] == 0.0  # most tokens do not fire: the low quantiles are exactly 0


def test_neurons_without_the_negative_side(tmp_path):
    run_dir, data_dir = make_run(tmp_path, n_features=8)
    ta.run(compose(overrides(run_dir, data_dir, "features.unit=neuron", "features.negative_side=false",
                             "features.pages=[0]")))
    recs = records(run_dir, "neurons")
    assert all("neg" not in r for r in recs)
    # GELU neurons are negative on most tokens: their low quantiles are unknown without that side
    assert sum(r["act_quantiles"][0] is None for r in recs) > len(recs) // 2


def test_site_shows_both_sides_and_the_layer(neuron_run):
    _, run_dir, _ = neuron_run
    site = run_dir / "features" / "neurons" / "site"
    page = (site / "feature" / "1.html").read_text(encoding="utf-8")
    assert "<title>Neuron 1 · layer 0 · neurons</title>" in page
    data = json.loads(page.split('<script type="application/json" id="data">')[1].split("</script>")[0])
    assert data["layer"] == 0 and data["neg"]["bottom"] and data["neg"]["min_act"] < 0
    assert all(min(e["a"]) < 0 for e in data["neg"]["bottom"])
    assert data["act_quantiles"]["p"] and len(data["act_quantiles"]["v"]) == len(data["act_quantiles"]["p"])
    assert 'id="bottom"' in page and 'id="neg-quantiles"' in page
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "layer 0" in index


def test_tokens_of_another_tokenizer_are_refused(tmp_path):
    run_dir, data_dir = make_run(tmp_path, n_features=8)
    meta = {"format": "monosemantic.tokens/1", "tokenizer": "other", "dtype": "uint16",
            "tokenizer_info": {"kind": "hf", "name": "other", "fingerprint": "ab" * 32}}
    (data_dir / "tiny" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"prepared with tokenizer 'other' \(fingerprint abababababab\)"):
        ta.run(compose(overrides(run_dir, data_dir, "features.unit=neuron")))


def test_both_sides_render_in_a_browser(neuron_run, tmp_path):
    """The neuron page in chromium: no errors, bottom examples and negative bins drawn, shaded blue."""
    from tests.helpers.browser import CHROMIUM, Watch

    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.helpers.browser import ARGS

    _, run_dir, _ = neuron_run
    site = run_dir / "features" / "neurons" / "site"
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        w = Watch(b)
        w.page.goto((site / "feature" / "1.html").as_uri())
        assert "layer 0" in w.page.text_content("#heading")
        assert "min act" in w.page.text_content("#stats")
        assert w.page.is_visible("#bottom") and w.page.locator("#bottom .ex").count() == 20
        assert w.page.locator("#neg-quantiles .bin").count() == 10
        assert "activation quantiles" in w.page.text_content("#act-quantiles")
        hit = w.page.locator("#bottom .ex").first.locator(".tok.hit")
        assert "60, 120, 255" in hit.evaluate("e => getComputedStyle(e).backgroundColor")
        w.page.screenshot(path=str(tmp_path / "neuron-1.png"), full_page=True)
        w.clean()
        w.page.goto((site / "index.html").as_uri())
        assert "layer 0" in w.page.text_content("#summary")
        assert " / -" in w.page.text_content("#rows tr:first-child")
        w.clean()
        b.close()
