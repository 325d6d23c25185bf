"""Describe and score, offline: scorer math, exemplar split, baseline explainer and simulator, resume,
bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.describe import RULES, cfg_for, make_run, make_sae_folder, read_lines
from tools.core.config import UserError
from tools.describe import describer, stage
from tools.describe.answers import parse_lines, value_evs
from tools.describe.exemplars import split_exemplars
from tools.describe.explainers import explain_baseline, mark_spans, parse_explanation, scale
from tools.describe.scorers import active_labels, balanced_accuracy, pearson, score
from tools.describe.simulators import parse_items, simulate_baseline
from tools.describe.synthetic import fires_after, fires_on, gelu_like_on, write_features

# ---- scorer math on hand inputs -------------------------------------------------------------


def test_pearson_hand_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pearson([5, 5, 5], [0, 1, 2]) == 0.0  # constant prediction: no information
    assert pearson([0, 1, 2], [3, 3, 3]) is None  # constant truth: undefined
    assert pearson([1], [2]) is None


def test_balanced_accuracy_hand_values():
    # TPR 1/1, TNR 2/3 -> (1 + 2/3) / 2
    assert balanced_accuracy([True, True, False, False], [True, False, False, False]) == pytest.approx(5 / 6)
    assert balanced_accuracy([True, False], [False, True]) == 0.0
    assert balanced_accuracy([True, True], [True, True]) is None  # one class only


def test_score_pools_tokens_and_splits_top_from_all():
    kinds = ["top", "quantile", "random"]
    true = [[0, 4, 0], [0, 2, 0], [0, 0, 0]]
    preds = [[0, 10, 0], [0, 0, 0], [0, 0, 10]]
    s = score(kinds, true, preds, threshold=1.0)
    assert s["simulation_top"] == pytest.approx(1.0)
    flat_p = [v for p in preds for v in p]
    flat_t = [v for t in true for v in t]
    assert s["simulation_all"] == pytest.approx(np.corrcoef(flat_p, flat_t)[0, 1], abs=1e-4)
    # top predicted active (right), quantile not (wrong), random predicted active (wrong)
    assert s["detection"] == pytest.approx(0.5 * (1 / 2 + 0 / 1))
    # failed contexts are left out rather than scored as zeros
    s2 = score(kinds, true, [[0, 10, 0], None, [0, 0, 0]], threshold=1.0)
    assert s2["detection"] == 1.0 and s2["simulation_all"] == pytest.approx(1.0)


def test_detection_label_is_relative_to_the_unit_max():
    """A context "activates" the unit when its max > negative_frac x max_act, whatever its kind: a
    GELU neuron's background (-0.1 .. 0.3) is inactive, a weak quantile context of an SAE feature too."""
    true = [[0.2, 5.0, -0.1], [0.3, 0.1, -0.1], [0.1, 0.2, 0.25]]
    assert active_labels(true, 5.0, 0.1) == [True, False, False]
    assert active_labels(true, 5.0, 0.0) == [True, True, True]  # "ever > 0": a GELU unit has no negatives
    assert active_labels([[0.0, 0.0]], 0.0, 0.1) == [False]
    kinds = ["top", "quantile", "random"]
    preds = [[0, 10, 0], [0, 0, 0], [0, 0, 0]]
    assert score(kinds, true, preds, threshold=1.0)["detection"] == pytest.approx(0.75)  # by kind
    s = score(kinds, true, preds, threshold=1.0, active=active_labels(true, 5.0, 0.1))
    assert s["detection"] == 1.0  # the quantile context is below the threshold: predicted inactive is right


# ---- exemplar split ---------------------------------------------------------------------------


def _ex(ctx: int, m: float) -> dict:
    return {"ctx": ctx, "start": 0, "pos": 0, "max": m, "tokens": [1], "strs": ["a"], "acts": [m]}


def test_split_is_disjoint_by_context():
    top = [_ex(c, 10 - c * 0.1) for c in range(20)]
    quantiles = [{"lo": 0, "hi": 1, "examples": [_ex(100, 0.5), _ex(3, 0.5), _ex(101, 0.4), _ex(102, 0.3)]},
                 {"lo": 1, "hi": 2, "examples": [_ex(200, 1.5), _ex(201, 1.4)]}]
    random = [_ex(c, 0.0) for c in range(300, 312)] + [_ex(4, 0.0)]
    split = split_exemplars({"top": top, "quantiles": quantiles, "random": random}, explain_top=10,
                            score_top=5, explain_per_bin=2, score_per_bin=2, explain_random=2,
                            score_random=20)
    seen = {e["ctx"] for e in split.explain + split.background}
    scored = [e["ctx"] for _, e in split.scoring()]
    assert seen.isdisjoint(scored)
    assert [e["ctx"] for e in split.score_top] == [1, 3, 5, 7, 9]  # held-out ranks interleave
    assert [e["ctx"] for e in split.explain[:10]] == [0, 2, 4, 6, 8, 10, 11, 12, 13, 14]
    # ctx 3 in a bin is seen by neither side twice; ctx 4 (explained) is dropped from the negatives
    assert 4 not in scored and split.dropped >= 1
    assert [e["ctx"] for e in split.score_random] == list(range(302, 312))
    assert {e["ctx"] for e in split.score_quantile} == {3, 102, 201} - seen


def test_stage_never_scores_what_the_explainer_saw(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path)
    seen: dict[int, set] = {}
    real = stage.Describer.run_simulation

    def spy(self, description, windows, split, usage, shuffle_seed):
        explained = {e["ctx"] for e in split.explain + split.background}
        scored = {e["ctx"] for _, e in windows}
        assert scored and explained.isdisjoint(scored)
        seen.setdefault(id(split), scored)
        return real(self, description, windows, split, usage, shuffle_seed)

    monkeypatch.setattr(stage.Describer, "run_simulation", spy)
    stage.run(cfg_for(run_dir))
    assert len(seen) == len(RULES)


# ---- baseline explainer and simulator --------------------------------------------------------


def test_planted_units_described_and_scored(tmp_path):
    run_dir = make_run(tmp_path)
    figures = stage.run(cfg_for(run_dir))
    recs = {r["index"]: r for r in read_lines(run_dir)}
    thou, rand, after_the = recs[0], recs[1], recs[2]
    assert '" thou"' in thou["description"]
    assert thou["tokens"][0]["str"] == " thou" and thou["tokens"][0]["kind"] == "token"
    assert thou["scores"]["simulation_all"] > 0.9 and thou["scores"]["detection"] > 0.9
    assert 'after " the"' in after_the["description"] and after_the["scores"]["simulation_all"] > 0.9
    assert abs(rand["scores"]["simulation_all"]) < 0.3
    for r in (thou, after_the):  # another unit's description scores far lower
        assert r["controls"]["random_description"]["simulation_all"] < r["scores"]["simulation_all"] - 0.5
    # Shuffled tokens, predictions put back in place: a token-identity unit needs no context, so its
    # description scores as well shuffled; a previous-token unit loses it (misaligned scoring would
    # have sunk both to ~0)
    assert thou["controls"]["shuffled_tokens"]["simulation_all"] > thou["scores"]["simulation_all"] - 0.05
    shuffled = after_the["controls"]["shuffled_tokens"]["simulation_all"]
    assert shuffled < after_the["scores"]["simulation_all"] - 0.5
    assert thou["controls"]["random_description"]["from"] != 0
    summary = json.loads((run_dir / "descriptions/l1/summary.json").read_text())
    assert summary["described"] == 4 and summary["complete"]
    assert summary["scores"]["simulation_all"]["mean"] > summary["controls"]["random_description"][
        "simulation_all"]["mean"]
    assert figures["described"] == 4 and figures["failed"] == 0 and figures["tokens"] == 0
    assert figures["simulation_all_mean"] == summary["scores"]["simulation_all"]["mean"]
    for r in recs.values():
        assert r["seed"] == 1337 and r["model"] == "baseline" and r["prompt_hash"]


def test_lexical_simulator_reading_rules():
    items = parse_items('Fires on " thou" (8), the token after "of" (3), "sweet love" and "x\\"y" (2.5)')
    assert items == [("token", " thou", 8.0), ("after", "of", 3.0), ("token", "sweet love", 10.0),
                     ("token", 'x"y', 2.5)]
    strs = [" banana", " ana", " of", " sweet", " love", " thou", "ana"]
    sim = simulate_baseline('"ana" (5), after " of" (3), " sweet love" (7), "thou" (9)', [strs])
    assert sim.preds == [[0, 5, 0, 3, 7, 9, 5]]  # "ana" is a whole token, not the end of " banana"
    na = simulate_baseline("tokens about royalty", [strs])
    assert na.not_applicable and na.preds == [None]


def test_baseline_explainer_reports_nothing_for_dead_input():
    ex = {"ctx": 0, "strs": ["a", "b"], "acts": [0.0, 0.0]}
    assert not explain_baseline([ex], []).ok


def test_llm_prompt_helpers():
    assert scale([0, 2, 4], 4) == [0, 5, 10]
    assert mark_spans(["a", " b", " c", " d"], [0, 3, 10, 0]) == "a<< b c>> d"
    assert parse_explanation("Sure.\nExplanation: the word \"thou\".\n") == 'the word "thou".'
    assert parse_explanation("**Explanation:** archaic pronouns") == "archaic pronouns"
    assert parse_explanation("") is None and parse_explanation("I'm sorry, I cannot help") is None
    assert parse_explanation("[1, 2, 3]") is None
    labels = [str(i) for i in range(10)]
    text = "0\t9\n1\t0\n"
    assert parse_lines(text, 2, labels) == ([9, 0], [(2, 3), (6, 7)])
    assert "expected index 1, got 0" in parse_lines("0\t9\n0\t0", 2, labels)
    assert "missing index 0" in parse_lines("", 2, labels)


def test_value_spread_over_tokens_is_taken_as_written():
    """Llama-style tokens: "10" is "1", "0"; the old reader counted p("1") as the value 1."""
    labels = [str(i) for i in range(11)]
    text = "0\t10\n1\t0"
    toks = ["0", "\t", "1", "0", "\n", "1", "\t", "0"]
    lp = [{"token": t, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": -0.1},
                                                          {"token": "2", "logprob": -2.4}]} for t in toks]
    response = {"choices": [{"message": {"content": text}, "logprobs": {"content": lp}}]}
    values, spans = parse_lines(text, 2, labels)
    assert values == [10, 0] and value_evs(response, text, spans, labels) == [None, None]
    # with 0-9 labels no label is a prefix of another: each single-token value gets its expected value
    values, spans = parse_lines("0\t9\n1\t0", 2, labels[:10])
    evs = value_evs({"choices": [{"logprobs": {"content": lp[:2] + [lp[3] | {"token": "9"}] + lp[4:]}}]},
                    "0\t9\n1\t0", spans, labels[:10])
    assert None not in evs and all(0 < ev < 3 for ev in evs)


# ---- resume ------------------------------------------------------------------------------------


def test_resume_skips_done_units_and_repairs_partial_line(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path)
    stage.run(cfg_for(run_dir, "describe.max_units=2"))
    first = read_lines(run_dir)
    assert [r["index"] for r in first] == [0, 1]
    assert not stage.done(cfg_for(run_dir))
    path = run_dir / "descriptions/l1/descriptions.jsonl"
    with open(path, "a") as f:
        f.write('{"index": 2, "status": "ok", "descr')  # a crash in the middle of a line
    calls = []
    real = describer.explain_baseline
    monkeypatch.setattr(describer, "explain_baseline", lambda *a, **k: calls.append(1) or real(*a, **k))
    stage.run(cfg_for(run_dir))
    recs = read_lines(run_dir)
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    assert recs[:2] == first  # untouched
    assert len(calls) == 2  # only units 2 and 3 were explained
    assert stage.done(cfg_for(run_dir))
    calls.clear()
    stage.run(cfg_for(run_dir))
    assert calls == [] and len(read_lines(run_dir)) == 4
    # a config change is not mixed with old results: the old file is kept aside and all units redone
    assert not stage.done(cfg_for(run_dir, "describe.fire_frac=0.5"))
    stage.run(cfg_for(run_dir, "describe.fire_frac=0.5"))
    assert len(calls) == 4 and len(read_lines(run_dir)) == 4
    assert len(list((run_dir / "descriptions/l1").glob("descriptions.*.jsonl"))) == 1


def test_neurons_folder_and_sae_name_resolution(tmp_path):
    write_features(tmp_path, "neurons", RULES[:2], unit="neuron", extra={" thou": 0.04})
    figures = stage.run(cfg_for(tmp_path, "features.unit=neuron"))
    assert figures["described"] == 2
    assert (tmp_path / "descriptions/neurons/summary.json").is_file()
    make_sae_folder(tmp_path, "a")
    make_sae_folder(tmp_path, "b")
    with pytest.raises(UserError, match="several SAEs"):
        stage.unit_name(cfg_for(tmp_path, "features.unit=sae"))
    assert stage.unit_name(cfg_for(tmp_path, "features.unit=sae", "features.sae=b")) == "b"


# ---- bad input -------------------------------------------------------------------------------


def test_missing_features_is_a_clear_error(tmp_path):
    make_sae_folder(tmp_path)
    with pytest.raises(UserError, match=r"features not found: .*l1/features\.jsonl"):
        stage.run(cfg_for(tmp_path))


def test_malformed_features_name_the_line(tmp_path):
    folder = make_run(tmp_path) / "features/l1"
    lines = (folder / "features.jsonl").read_text().splitlines()
    (folder / "features.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(UserError, match=r"features\.jsonl:2: not valid JSON"):
        stage.run(cfg_for(tmp_path))
    bad = json.loads(lines[0])
    bad["top"][0]["acts"] = bad["top"][0]["acts"][:-1]
    (folder / "features.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(UserError, match=r"features\.jsonl:1 \(unit 0\): top\[0\]: `strs` and `acts`"):
        stage.run(cfg_for(tmp_path))


def test_too_few_exemplars_is_skipped_with_reason(tmp_path):
    folder = make_run(tmp_path, rules=RULES[:2]) / "features/l1"
    lines = [json.loads(x) for x in (folder / "features.jsonl").read_text().splitlines()]
    lines[0]["top"] = lines[0]["top"][:3]
    lines[0]["quantiles"] = []
    lines[1].update(top=[], quantiles=[])  # a dead unit
    (folder / "features.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    figures = stage.run(cfg_for(tmp_path))
    recs = read_lines(tmp_path)
    assert [r["status"] for r in recs] == ["skipped", "skipped"]
    assert "explanation exemplars" in recs[0]["reason"] and "never fired" in recs[1]["reason"]
    assert figures["skipped"] == 2 and figures["simulation_all_mean"] is None


@pytest.mark.parametrize("override, match", [
    ("describe.explainer=magic", "describe.explainer"),
    ("+describe.explainerr=llm", "explainerr"),
    ("describe.fire_frac=0", "describe.fire_frac"),
    ("describe.simulator=llm", "describe.model"),
])
def test_bad_config_names_the_key(tmp_path, override, match):
    make_run(tmp_path)
    with pytest.raises(UserError, match=match):
        stage.run(cfg_for(tmp_path, override))


def test_openai_group_requires_model(tmp_path):
    make_run(tmp_path)
    with pytest.raises(UserError, match="model"):
        stage.run(cfg_for(tmp_path, "describe=openai"))


def test_cli_exit_code_and_message(tmp_path):
    cmd = [sys.executable, "-m", "tools.describe", f"run_dir={tmp_path}", "features.unit=neuron"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "features not found" in proc.stderr and "Traceback" not in proc.stderr


def test_summary_means_are_means_of_records(tmp_path):
    run_dir = make_run(tmp_path)
    stage.run(cfg_for(run_dir))
    recs = read_lines(run_dir)
    summary = json.loads((run_dir / "descriptions/l1/summary.json").read_text())
    vals = [r["scores"]["detection"] for r in recs]
    assert summary["scores"]["detection"]["mean"] == pytest.approx(sum(vals) / len(vals), abs=1e-4)
    assert not any(math.isnan(v) for v in vals)


def test_site_is_rerendered_with_descriptions(tmp_path, monkeypatch):
    import tools.html.site as site

    run_dir = make_run(tmp_path)
    seen = []

    def fake_render(run_dir_arg, name):
        lines = (Path(run_dir_arg) / "descriptions" / name / "descriptions.jsonl").read_text().splitlines()
        seen.append((Path(run_dir_arg), name, len(lines)))
        return Path(run_dir_arg) / "features" / name / "site" / "index.html"

    monkeypatch.setattr(site, "render_site", fake_render)
    figures = stage.run(cfg_for(run_dir, "describe.site=true"))
    assert seen == [(run_dir, "l1", len(RULES))]  # called once, after every unit was written
    assert figures["site"].endswith("index.html")

    def broken(run_dir_arg, name):
        raise UserError("templates missing")

    monkeypatch.setattr(site, "render_site", broken)
    assert stage.run(cfg_for(run_dir, "describe.site=true"))["site"] is None  # reported, not fatal


def test_streams_features_in_chunks(tmp_path):
    run_dir = make_run(tmp_path)
    stage.run(cfg_for(run_dir, "describe.chunk_units=3"))
    chunked = {r["index"]: r for r in read_lines(run_dir)}
    stage.run(cfg_for(run_dir, "describe.overwrite=true"))
    whole = {r["index"]: r for r in read_lines(run_dir)}
    assert sorted(chunked) == sorted(whole) == list(range(len(RULES)))
    assert all(chunked[i]["scores"] == whole[i]["scores"] for i in whole)
    # the first chunk's units draw their random-description control from that chunk only
    assert chunked[0]["controls"]["random_description"]["from"] in (1, 2)


def test_duplicate_unit_index_is_bad_input(tmp_path):
    folder = make_run(tmp_path, rules=RULES[:1]) / "features/l1"
    line = (folder / "features.jsonl").read_text()
    (folder / "features.jsonl").write_text(line + line)
    with pytest.raises(UserError, match="more than one line"):
        stage.run(cfg_for(tmp_path))


def test_gelu_like_neuron_gets_negatives_and_a_detection_score(tmp_path):
    """A neuron that is never exactly 0 (small values everywhere, large on " thou") has negatives
    under the relative threshold, is described and gets a high detection score; the controls are lower."""
    rules = [gelu_like_on(" thou"), fires_on(" king"), fires_after(" the")]
    folder = write_features(tmp_path, "neurons", rules, unit="neuron", extra={" thou": 0.04})
    units = [json.loads(x) for x in (folder / "features.jsonl").read_text().splitlines()]
    gelu = units[0]
    assert len(gelu["random"]) == 20 and all(max(e["acts"]) > 0 for e in gelu["random"])  # never silent
    assert all(max(e["acts"]) <= 0.1 * gelu["max_act"] for e in gelu["random"])
    figures = stage.run(cfg_for(tmp_path, "features.unit=neuron", "describe.score_random=10"))
    assert figures["described"] == 3
    rec = {r["index"]: r for r in read_lines(tmp_path, "neurons")}[0]
    assert '" thou"' in rec["description"] and rec["exemplars"]["score_random"] >= 2
    s = rec["scores"]
    assert s["detection"] is not None and s["detection"] > 0.9 and s["simulation_all"] > 0.8
    control = rec["controls"]["random_description"]
    assert control["detection"] is None or control["detection"] < s["detection"] - 0.3
    assert control["simulation_all"] < s["simulation_all"] - 0.5
    summary = json.loads((tmp_path / "descriptions/neurons/summary.json").read_text())
    assert summary["negative_frac"] == 0.1 and summary["scores"]["detection"]["n"] == 3


def test_negative_frac_from_meta_and_units_without_negatives_are_skipped(tmp_path):
    """negative_frac=0 is the old rule (negatives never fire): the GELU-like neuron then has none
    and is skipped with describe.min_score_random=2, or scored without detection by default;
    a meta.json without the key means 0.1."""
    write_features(tmp_path, "neurons", [gelu_like_on(" thou")], unit="neuron", extra={" thou": 0.04},
                   negative_frac=0.0)
    stage.run(cfg_for(tmp_path, "features.unit=neuron", "describe.min_score_random=2",
                      "describe.score_random=10"))
    rec = read_lines(tmp_path, "neurons")[0]
    assert rec["status"] == "skipped" and "non-firing contexts" in rec["reason"]
    assert json.loads((tmp_path / "descriptions/neurons/summary.json").read_text())["negative_frac"] == 0.0
    # with min_score_random=0 it is still described and simulated; without uniform windows or quantiles
    # there is no negative, so no detection score
    stage.run(cfg_for(tmp_path, "features.unit=neuron", "describe.score_uniform=0",
                      "describe.detection_quantiles=[]"))
    rec = read_lines(tmp_path, "neurons")[0]
    assert rec["status"] == "ok" and rec["scores"]["detection"] is None
    assert rec["scores"]["simulation_top"] > 0.8
    # by default its uniform windows and its own quantiles give it negatives, and a detection score
    stage.run(cfg_for(tmp_path, "features.unit=neuron"))
    rec = read_lines(tmp_path, "neurons")[0]
    assert rec["scores"]["detection"] is not None and rec["detection_truth"]["rule"].startswith("q")
    write_features(tmp_path, "neurons", [gelu_like_on(" thou")], unit="neuron", extra={" thou": 0.04},
                   negative_frac=None)
    assert not stage.done(cfg_for(tmp_path, "features.unit=neuron"))
    stage.run(cfg_for(tmp_path, "features.unit=neuron"))
    assert read_lines(tmp_path, "neurons")[0]["status"] == "ok"
    assert json.loads((tmp_path / "descriptions/neurons/summary.json").read_text())["negative_frac"] == 0.1
    meta = tmp_path / "features/neurons/meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "negative_frac": 2}))
    with pytest.raises(UserError, match="negative_frac"):
        stage.run(cfg_for(tmp_path, "features.unit=neuron"))
