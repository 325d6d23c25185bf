"""Transluce-style selection (candidates from exemplar subsets, chosen on validation, reported on
test), the three-way split's disjointness, detection truth from a unit quantile, and unit lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.core.config import UserError, compose
from tools.describe import stage
from tools.describe.exemplars import split_exemplars, split_validation
from tools.describe.selection import candidate_subsets, subset_size
from tools.describe.synthetic import fires_after, fires_on, write_features

RULES = [fires_on(" thou"), fires_after(" the"), fires_on(" king")]


def make_run(tmp_path: Path, rules=RULES, name: str = "l1", **kw) -> Path:
    write_features(tmp_path, name, rules, extra={" thou": 0.04}, **kw)
    (tmp_path / "sae" / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / "sae" / name / "cfg.json").write_text("{}")
    return tmp_path


def run(run_dir: Path, *overrides: str, name: str = "l1") -> list[dict]:
    stage.run(compose([f"run_dir={run_dir}", "describe.site=false", *overrides]))
    path = run_dir / "descriptions" / name / "descriptions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def ex(ctx: int, n: int = 3) -> dict:
    return {"ctx": ctx, "strs": ["a"] * n, "acts": [1.0] * n}


def test_three_way_split_is_disjoint_by_context():
    """Windows of one context (a passage) never land on two sides, whatever kinds they come from."""
    record = {"top": [ex(c) for c in range(12)],
              "quantiles": [{"examples": [ex(3), ex(20), ex(21), ex(5), ex(22)]}],
              "random": [ex(30), ex(31), ex(20), ex(32), ex(33)],
              "uniform": [ex(5), ex(40), ex(41), ex(1), ex(42), ex(43)]}
    split = split_validation(split_exemplars(record, explain_top=6, score_top=6, explain_per_bin=1,
                                             score_per_bin=2, explain_random=1, score_random=4,
                                             score_uniform=6))
    explain = {e["ctx"] for e in split.explain + split.background}
    test = [e["ctx"] for _, e in split.scoring()]
    val = [e["ctx"] for _, e in split.validation]
    assert test and val
    assert explain.isdisjoint(test) and explain.isdisjoint(val) and set(test).isdisjoint(val)
    # context 20 is a quantile and a random window, context 5 a quantile and a uniform one: one side each
    assert (20 in test) != (20 in val) and (test + val).count(20) == 2
    assert {k for k, _ in split.validation} >= {"top", "random", "uniform"}


def test_candidate_subsets_differ_and_are_reproducible():
    a = candidate_subsets(10, 4, subset_size(10, None, 3), [0, 5, 7])
    assert a == candidate_subsets(10, 4, 7, [0, 5, 7]) and len({tuple(s) for s in a}) == 4
    assert all(len(s) == 7 and s == sorted(s) for s in a)
    assert candidate_subsets(10, 4, 7, [0, 6, 7]) != a
    assert subset_size(4, None, 3) == 3 and subset_size(4, 9, 3) == 4


def test_candidates_chosen_on_validation_and_scored_on_test(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path)
    seen: list[tuple[str, set, set]] = []
    real = stage.Describer.run_simulation

    def spy(self, description, windows, split, usage, shuffle_seed):
        seen.append((description, {e["ctx"] for _, e in windows}, {e["ctx"] for _, e in split.validation}))
        return real(self, description, windows, split, usage, shuffle_seed)

    monkeypatch.setattr(stage.Describer, "run_simulation", spy)
    recs = run(run_dir, "describe.candidates=4", "describe.candidate_exemplars=4", "describe.controls=false")
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == len(RULES)
    for r in ok:
        cands = r["candidates"]
        assert len(cands) == 4 and sum(c["chosen"] for c in cands) == 1
        assert len({tuple(c["exemplars"]) for c in cands}) == 4  # each from its own subset
        chosen = next(c for c in cands if c["chosen"])
        assert chosen["description"] == r["description"]
        vals = [c["validation"]["simulation_all"] for c in cands if c["validation"]]
        assert chosen["validation"]["simulation_all"] == max(vals)
        sel = r["selection"]
        assert sel["candidates"] == 4 and sel["validation_windows"] > 0
        assert sel["first_candidate_test_simulation_all"] is not None
    # every validation simulation ran on validation windows only; test scores never touched them
    for _desc, windows, val in seen:
        assert windows == val or windows.isdisjoint(val)
    summary = json.loads((run_dir / "descriptions/l1/summary.json").read_text())
    s = summary["selection"]
    assert s["chosen_test"]["n"] == len(ok) and s["first_candidate_test"]["n"] == len(ok)
    assert s["gain"]["n"] == len(ok)


def test_too_few_windows_for_three_way_split_skips_with_reason(tmp_path):
    run_dir = make_run(tmp_path)
    recs = run(run_dir, "describe.candidates=3", "describe.score_top=3", "describe.score_per_bin=0",
               "describe.min_score_firing=2")
    assert recs and all(r["status"] == "skipped" for r in recs)
    assert "three-way split" in recs[0]["reason"]


def test_detection_truth_from_unit_quantile_gives_gelu_neurons_negatives(tmp_path):
    """A GELU-like neuron is above 0.1 x max somewhere in nearly every window, so the max-fraction rule
    leaves it no negatives; its own high quantile does. A sparse unit keeps the max-fraction rule."""
    def broad(strs, rng):  # active everywhere at up to a third of its max, like a dense GELU neuron
        return [float(rng.uniform(4, 6)) if s == " thou" else float(rng.uniform(-0.1, 2.0)) for s in strs]

    run_dir = make_run(tmp_path, rules=[broad], n_uniform=10, quantiles=True)
    old = run(run_dir, "describe.detection_quantiles=[]", "describe.overwrite=true",
              "describe.controls=false")
    assert old[0]["status"] == "ok" and old[0]["scores"]["detection"] is None
    new = run(run_dir, "describe.overwrite=true", "describe.controls=false")
    truth = new[0]["detection_truth"]
    assert truth["rule"] in ("q0.99", "q0.999") and truth["threshold"] > 2.0  # above the dense floor
    assert new[0]["scores"]["detection"] is not None and new[0]["scores"]["detection_auc"] is not None
    sparse = run(make_run(tmp_path / "sparse"), "describe.controls=false")
    assert {r["detection_truth"]["rule"] for r in sparse if r["status"] == "ok"} == {"0.1 x max_act"}


def test_bad_selection_settings_are_one_line_errors(tmp_path):
    run_dir = make_run(tmp_path)
    for bad in ("describe.candidate_exemplars=0", "describe.detection_quantiles=[1.5]"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            stage.run(compose([f"run_dir={run_dir}", "describe.site=false", bad]))


def test_unit_ids_with_layers(tmp_path):
    from tools.describe.units import read_units

    assert read_units(["3", "10:4", [10, 5], "2:9", 7], layer=10) == [3, 4, 5, 7]
    (tmp_path / "ids.txt").write_text("# layer:index\n10:1\n11:2  # another layer\n10:2\n")
    assert read_units(str(tmp_path / "ids.txt"), layer=10) == [1, 2]
    with pytest.raises(UserError, match="none of the 1 listed units is in layer 3"):
        read_units(["10:1"], layer=3)
    with pytest.raises(UserError, match="no `layer`"):
        read_units(["10:1"], layer=None)
    with pytest.raises(UserError, match="layer:index"):
        read_units(["x:1"], layer=3)
    run_dir = make_run(tmp_path)
    meta_path = run_dir / "features/l1/meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "layer": 4}))
    recs = run(run_dir, "describe.units=[4:2,5:0,4:0]", "describe.controls=false")
    assert sorted(r["index"] for r in recs) == [0, 2]
