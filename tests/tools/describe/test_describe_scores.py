"""Scores that compare like with like: bootstrap intervals, failed contexts counted, threshold-free
detection, density deciles, uniform held-out windows, and which units a run covers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools.core.config import UserError, compose, section
from tools.describe import stage
from tools.describe.config import DescribeConfig
from tools.describe.exemplars import split_exemplars
from tools.describe.scorers import auc, score, with_failures_as_zero
from tools.describe.summary import bootstrap_ci, density_deciles, summarize
from tools.describe.synthetic import fires_after, fires_on, fires_randomly, write_features


def make_run(tmp_path: Path, rules, **kw) -> Path:
    write_features(tmp_path, "l1", rules, **kw)
    (tmp_path / "sae/l1").mkdir(parents=True, exist_ok=True)
    (tmp_path / "sae/l1/cfg.json").write_text("{}")
    return tmp_path


def indices_or_records(folder: Path) -> list[dict]:
    return [json.loads(ln) for ln in (folder / "descriptions.jsonl").read_text().splitlines()]


def cfg_for(run_dir: Path, *overrides: str):
    return compose([f"run_dir={run_dir}", "describe.site=false", *overrides])


def test_bootstrap_interval_on_known_data():
    rng = np.random.default_rng(0)
    values = rng.normal(0.4, 0.1, size=400).tolist()
    lo, hi = bootstrap_ci(values)
    se = 0.1 / np.sqrt(400)  # the mean's standard error: the interval is about +-1.96 se around 0.4
    assert lo < np.mean(values) < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_ci([0.5]) is None and bootstrap_ci([0.3, 0.3, 0.3]) == [0.3, 0.3]
    assert bootstrap_ci(values) == [lo, hi]  # a function of the values alone


def test_failed_contexts_scored_as_zeros_beside():
    kinds = ["top", "top", "random"]
    acts = [[0.0, 5.0], [0.0, 4.0], [0.0, 0.0]]
    preds = [[0.0, 9.0], None, [0.0, 0.0]]
    dropped = score(kinds, acts, preds, threshold=1.0)
    zeros = score(kinds, acts, with_failures_as_zero(preds, [2, 2, 2]), threshold=1.0)
    assert dropped["simulation_all"] == pytest.approx(1.0)
    assert zeros["simulation_all"] < 0.9  # the failed firing context now counts against it
    recs = [{"index": 0, "status": "ok", "failed_contexts": 1, "scores": dropped, "controls": None},
            {"index": 1, "status": "failed", "failed_contexts": 3, "reason": "x"}]
    assert summarize(recs, 2)["failed_contexts"] == 4


def test_auc_detection_is_threshold_free():
    assert auc([0.2, 0.3, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert auc([2.1, 2.1, 2.1], [True, False, False]) == 0.5  # constant prediction: chance
    assert auc([1.0, 2.0], [True, True]) is None
    s = score(["top", "random"], [[0.0, 5.0], [0.0, 0.0]], [[2.0, 2.5], [2.0, 2.2]], threshold=1.0)
    assert s["detection"] == 0.5 and s["detection_auc"] == 1.0  # EVs all above the fixed threshold


def test_density_deciles():
    ok = [{"density": d, "scores": {"simulation_all": v}} for d, v in
          zip(np.linspace(0.001, 0.1, 40), np.linspace(0, 1, 40), strict=True)]
    rows = density_deciles(ok)
    assert len(rows) == 10 and sum(r["n"] for r in rows) == 40
    means = [r["mean"] for r in rows]
    assert means == sorted(means) and rows[0]["density_min"] == pytest.approx(0.001)


def test_uniform_windows_scored_when_the_features_stage_emits_them(tmp_path):
    """What the features stage is to emit: `uniform`, windows drawn uniformly from held-out text
    (Example objects, any activation). They are scored for every unit and make simulation_top_uniform."""
    run_dir = make_run(tmp_path, [fires_on(" thou"), fires_after(" the")], extra={" thou": 0.04})
    path = run_dir / "features/l1/features.jsonl"
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    for rec in lines:  # planted: some of the unit's own windows as if sampled uniformly
        rec["uniform"] = [dict(ex, ctx=10_000 + n) for n, ex in enumerate((rec["random"] + rec["top"])[:6])]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    split = split_exemplars(lines[0], explain_top=10, score_top=5, explain_per_bin=1, score_per_bin=1,
                            explain_random=2, score_random=10, score_uniform=4)
    assert len(split.score_uniform) == 4 and [k for k, _ in split.scoring()].count("uniform") == 4
    stage.run(cfg_for(run_dir))
    recs = indices_or_records(run_dir / "descriptions/l1")
    for r in recs:
        assert r["exemplars"]["score_uniform"] == 6 and r["scores"]["simulation_top_uniform"] is not None
    summary = json.loads((run_dir / "descriptions/l1/summary.json").read_text())
    assert summary["scores"]["simulation_top_uniform"]["n"] == 2


def test_sample_and_unit_list(tmp_path):
    rules = [fires_on(" thou"), fires_randomly(), fires_after(" the"), fires_on(" king"), fires_on(" lord")]
    run_dir = make_run(tmp_path, rules)
    figures = stage.run(cfg_for(run_dir, "describe.sample=3", "describe.tag=s"))
    first = [json.loads(ln)["index"] for ln in (run_dir / "descriptions/l1-s/descriptions.jsonl").open()]
    assert figures["units"] == 3 and len(set(first)) == 3
    # the same seed picks the same units however the run went; another seed may differ
    assert stage.select_units(run_dir / "features/l1/features.jsonl", list(range(5)),
                              stage.DescribeStage(cfg_for(run_dir, "describe.sample=3")).c) == sorted(first)
    (tmp_path / "units.txt").write_text("4\n# a comment\n1\n")
    figures = stage.run(cfg_for(run_dir, f"describe.units={tmp_path / 'units.txt'}", "describe.tag=u"))
    assert [r["index"] for r in indices_or_records(run_dir / "descriptions/l1-u")] == [1, 4]
    figures = stage.run(cfg_for(run_dir, "describe.units=[2]", "describe.tag=v"))
    assert figures["units"] == 1
    with pytest.raises(UserError, match="not in"):
        stage.run(cfg_for(run_dir, "describe.units=[99]", "describe.tag=w"))
    with pytest.raises(UserError, match="describe.tag"):
        section(cfg_for(run_dir, "describe.tag=a/b"), "describe", DescribeConfig)


def test_negative_side_described_separately(tmp_path):
    """polarity=neg describes a signed unit's negative side from its own bottom-k exemplars
    (features.jsonl `neg`), into descriptions/<name>-neg; a unit without one is skipped."""
    run_dir = make_run(tmp_path, [fires_on(" thou"), fires_on(" king")], extra={" thou": 0.04})
    path = run_dir / "features/l1/features.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]

    def negated(ex):
        rest = {k: v for k, v in ex.items() if k != "max"}
        return {**rest, "min": -ex["max"], "acts": [-a for a in ex["acts"]]}

    king = recs[1]  # unit 0's negative side fires (below 0) on " king"
    bins = [{"lo": -q["hi"], "hi": -q["lo"], "examples": [negated(e) for e in q["examples"]]}
            for q in reversed(king["quantiles"])]
    recs[0]["neg"] = {"density": king["density"], "min_act": -king["max_act"], "quantiles": bins,
                      "bottom": [negated(e) for e in king["top"]],
                      "random": [negated(e) for e in king["random"]]}
    # uniform windows carry the unit's signed activations: here negative on " king"
    recs[0]["uniform"] = [{**e, "acts": [-a for a in e["acts"]]} for e in king["uniform"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    stage.run(cfg_for(run_dir, "describe.polarity=neg"))
    out = {r["index"]: r for r in indices_or_records(run_dir / "descriptions/l1-neg")}
    assert out[0]["status"] == "ok" and out[0]["polarity"] == "neg"
    assert '" king"' in out[0]["description"] and '" thou"' not in out[0]["description"]
    assert out[0]["scores"]["simulation_all"] > 0.9
    assert out[1]["status"] == "skipped" and "no negative side" in out[1]["reason"]
    pos = stage.run(cfg_for(run_dir))  # the positive side is untouched, in its own folder
    assert pos["described"] == 2
    assert '" thou"' in indices_or_records(run_dir / "descriptions/l1")[0]["description"]
