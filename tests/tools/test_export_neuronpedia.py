"""The Neuronpedia export: SAEDashboard batch records and Neuronpedia's bulk-import rows against the
features.jsonl they come from, description runs as explanations, hostile strings, bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.describe import make_run
from tools import export_neuronpedia as xn
from tools.core.config import UserError, compose
from tools.features.records import iter_records

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ['</script><img src=x onerror="x()">', '"quoted" \\back\\slash', "new\nline\ttab",
           "nul\u0000byte", "\u202eRTL", "日本語 🎉", "\ud800lone"]
FEATURE_FIELDS = {  # SAEDashboard's NeuronpediaDashboardFeature.to_dict
    "feature_index": int, "neuron_alignment_indices": list, "neuron_alignment_values": list,
    "neuron_alignment_l1": list, "correlated_neurons_indices": list, "correlated_neurons_l1": list,
    "correlated_neurons_pearson": list, "correlated_features_indices": list, "correlated_features_l1": list,
    "correlated_features_pearson": list, "neg_str": list, "neg_values": list, "pos_str": list,
    "pos_values": list, "frac_nonzero": float, "freq_hist_data_bar_values": list,
    "freq_hist_data_bar_heights": list, "logits_hist_data_bar_heights": list,
    "logits_hist_data_bar_values": list, "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str,
    "decoder_weights_dist": list, "activations": list, "vector": list}
ACTIVATION_FIELDS = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}


def _enrich(run_dir: Path, name: str = "l1") -> None:
    """Give the synthetic records what the features stage writes and the synthetic set leaves out: bin
    counts, a real histogram, logit effects; and hostile token strings in unit 0's top example."""
    path = run_dir / "features" / name / "features.jsonl"
    recs = list(iter_records(path))
    for r in recs:
        for k, b in enumerate(r["quantiles"]):
            b["count"] = 10 * (k + 1)
        r["hist"] = {"edges": [0.0, 1.0, 2.0, 4.0], "counts": [5, 3, 1]}
        r["logits"] = {"pos": [{"id": 1, "str": HOSTILE[0], "value": 0.5},
                               {"id": 2, "str": " a", "value": 0.25}],
                       "neg": [{"id": 3, "str": HOSTILE[1], "value": -0.75}]}
    top = recs[0]["top"][0]
    top["strs"][: len(HOSTILE)] = HOSTILE
    _write(path, recs)


def _write(path: Path, recs: list[dict]) -> None:
    """ASCII-escaped JSON lines: a lone surrogate can be written only as `\\ud800`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def _describe_run(run_dir: Path, folder: str, tag: str | None, records: list[dict]) -> None:
    d = run_dir / "descriptions" / folder
    d.mkdir(parents=True)
    (d / "descriptions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (d / "summary.json").write_text(json.dumps({"name": "l1", "tag": tag, "units": len(records)}))


@pytest.fixture
def exported(tmp_path):
    run_dir = make_run(tmp_path)
    _enrich(run_dir)
    base = {"status": "ok", "explainer": "llm", "simulator": "llm", "scores": {"simulation_all": 0.5}}
    _describe_run(run_dir, "l1", None, [
        {**base, "index": 0, "description": "the word thou " + HOSTILE[0], "model": "Qwen/Qwen2.5-7B"},
        {**base, "index": 1, "status": "failed", "description": None, "model": "Qwen/Qwen2.5-7B"},
        {**base, "index": 2, "description": "after the", "model": "Qwen/Qwen2.5-7B"}])
    _describe_run(run_dir, "l1-base", "base", [
        {**base, "index": i, "description": f"baseline {i}", "model": "baseline", "explainer": "baseline"}
        for i in range(4)])
    summary = xn.run(compose([f"run_dir={run_dir}", "features.sae=l1", "+neuronpedia.model_id=gpt-test",
                              "+neuronpedia.batch_size=3"]))
    return run_dir, run_dir / "neuronpedia" / "l1", summary


def _gz(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()]


def _batches(folder: Path) -> list[dict]:
    files = sorted(folder.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text(encoding="utf-8")) for p in files]


def test_records_have_saedashboard_fields_and_match_the_source(exported):
    run_dir, out, summary = exported
    src = {r["index"]: r for r in iter_records(run_dir / "features" / "l1" / "features.jsonl")}
    batches = _batches(out)
    assert [len(b["features"]) for b in batches] == [3, 1]  # batch_size 3, 4 units
    assert all(b["model_id"] == "gpt-test" and b["sae_set"] == "l1" and b["sae_id_suffix"] is None
               for b in batches)
    feats = [f for b in batches for f in b["features"]]
    assert [f["feature_index"] for f in feats] == sorted(src) and summary["features"] == 4
    for f in feats:
        assert set(f) == set(FEATURE_FIELDS)
        for key, typ in FEATURE_FIELDS.items():
            assert isinstance(f[key], typ), key
        r = src[f["feature_index"]]
        assert f["frac_nonzero"] == r["density"]
        assert f["pos_str"] == [t["str"] for t in r["logits"]["pos"]]
        assert f["pos_values"] == [t["value"] for t in r["logits"]["pos"]]
        assert f["neg_str"] == [t["str"] for t in r["logits"]["neg"]]
        assert f["freq_hist_data_bar_values"] == [0.5, 1.5, 3.0]
        assert f["freq_hist_data_bar_heights"] == [5, 3, 1]
        assert f["logits_hist_data_bar_heights"] == [] and f["vector"] == []  # not in features.jsonl
        examples = r["top"] + [e for b in r["quantiles"] for e in b["examples"]]
        assert len(f["activations"]) == len(examples)
        total = sum(b["count"] for b in r["quantiles"])
        bounds = [(-1, r["max_act"], -1)] * len(r["top"]) + [
            (b["lo"], b["hi"], b["count"] / total) for b in r["quantiles"] for _ in b["examples"]]
        for a, ex, (lo, hi, share) in zip(f["activations"], examples, bounds, strict=True):
            assert set(a) == ACTIVATION_FIELDS
            assert len(a["tokens"]) == len(a["values"]) == len(ex["acts"])
            assert a["values"] == ex["acts"] and a["qualifying_token_index"] == ex["pos"]
            assert (a["bin_min"], a["bin_max"]) == (lo, hi)
            assert a["bin_contains"] == pytest.approx(share, rel=1e-5)
            assert a["tokens"] == [s.replace("\ud800", "\ufffd") for s in ex["strs"]]


def test_hostile_strings_survive_the_json_round_trip(exported):
    _, out, _ = exported
    top = _batches(out)[0]["features"][0]["activations"][0]["tokens"]
    assert top[: len(HOSTILE) - 1] == HOSTILE[:-1]  # exactly, NUL and RTL override included
    assert top[len(HOSTILE) - 1] == "\ufffdlone"  # a lone surrogate is not UTF-8: replaced, visibly
    acts = _gz(next((out / "import" / "gpt-test" / "0-l1" / "activations").glob("batch-0.jsonl.gz")))
    assert acts[0]["tokens"] == top
    for p in out.rglob("*"):
        if p.is_file():
            raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            raw.decode("utf-8")  # strict: every file is valid UTF-8


def test_descriptions_become_explanations_with_their_model(exported):
    _, out, summary = exported
    src = out / "import" / "gpt-test" / "0-l1"
    for name in ("release", "model", "sourceset", "source"):
        assert (src / f"{name}.jsonl").is_file()
    source = json.loads((src / "source.jsonl").read_text())
    assert source["id"] == "0-l1" and source["modelId"] == "gpt-test" and source["setName"] == "l1"
    expl = [e for p in sorted((src / "explanations").glob("*.jsonl.gz")) for e in _gz(p)]
    by = {(e["index"], e["explanationModelName"]): e for e in expl}
    assert len(expl) == 2 + 4 == summary["explanations"]  # the failed unit has none
    assert by[("0", "Qwen/Qwen2.5-7B")]["description"] == "the word thou " + HOSTILE[0]
    assert by[("2", "baseline")]["description"] == "baseline 2"
    assert all(e["layer"] == "0-l1" and e["modelId"] == "gpt-test" and e["authorId"] for e in expl)
    assert "simulation_all 0.500" in by[("0", "Qwen/Qwen2.5-7B")]["notes"]
    assert len({e["id"] for e in expl}) == len(expl)
    types = [json.loads(line) for line in (out / "import" / "explanation_model_types.jsonl").read_text()
             .splitlines()]
    assert sorted(t["name"] for t in types) == ["Qwen/Qwen2.5-7B", "baseline"]
    neurons = _gz(src / "features" / "batch-0.jsonl.gz")
    acts = _gz(src / "activations" / "batch-0.jsonl.gz")
    assert [n["index"] for n in neurons] == ["0", "1", "2"]
    assert neurons[0]["maxActApprox"] == max(a["maxValue"] for a in acts if a["index"] == "0")
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["descriptions"] == ["l1", "l1-base"] and settings["sides"]["pos"]["features"] == 4


def test_negative_side_is_the_negated_unit(tmp_path):
    run_dir = make_run(tmp_path)
    _enrich(run_dir)
    path = run_dir / "features" / "l1" / "features.jsonl"
    recs = list(iter_records(path))
    for r in recs:
        flip = lambda e: {**e, "min": -e["max"], "acts": [-a for a in e["acts"]]}  # noqa: E731
        bins = [{"lo": -b["hi"], "hi": -b["lo"], "count": b["count"],
                 "examples": [flip(e) for e in b["examples"]]} for b in r["quantiles"]]
        r["neg"] = {"density": 0.25, "min_act": -r["max_act"], "mean_act": -1.0, "hist": r["hist"],
                    "bottom": [flip(e) for e in r["top"]] if r["index"] != 3 else [],
                    "quantiles": bins[::-1], "random": []}
    _write(path, recs)
    xn.run(compose([f"run_dir={run_dir}", "features.sae=l1", "+neuronpedia.model_id=m"]))
    out = run_dir / "neuronpedia" / "l1"
    neg = [f for b in _batches(out / "neg") for f in b["features"]]
    pos = {f["feature_index"]: f for b in _batches(out) for f in b["features"]}
    assert [f["feature_index"] for f in neg] == [0, 1, 2]  # unit 3's negative side has no examples
    assert json.loads((out / "neg" / "skipped_indexes.json").read_text())["skipped_indexes"] == [3]
    for f in neg:
        p = pos[f["feature_index"]]
        assert f["frac_nonzero"] == 0.25
        assert f["pos_str"] == p["neg_str"] and f["pos_values"] == [-v for v in p["neg_values"]]
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert [a["values"] for a in top] == [a["values"] for a in p["activations"] if a["bin_min"] == -1]
        bins = [(a["bin_min"], a["bin_max"]) for a in f["activations"] if a["bin_min"] != -1]
        assert all(0 <= lo < hi for lo, hi in bins) and bins == sorted(bins)
    assert (out / "import" / "m" / "0-l1__neg" / "source.jsonl").is_file()


def test_a_rerun_replaces_the_folder_whole(exported):
    run_dir, out, _ = exported
    (out / "stray.txt").write_text("old")
    xn.run(compose([f"run_dir={run_dir}", "features.sae=l1", "+neuronpedia.model_id=gpt-test"]))
    assert not (out / "stray.txt").exists() and len(_batches(out)) == 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".l1.")]


def test_bad_inputs_are_one_line(tmp_path):
    run_dir = make_run(tmp_path)
    with pytest.raises(UserError, match="features.sae='nope'"):
        xn.run(compose([f"run_dir={run_dir}", "features.sae=nope"]))
    with pytest.raises(UserError, match="neuronpedia.model_id"):
        xn.run(compose([f"run_dir={run_dir}", "features.sae=l1", "+neuronpedia.model_id=a/b"]))
    (run_dir / "features" / "l1" / "features.jsonl").write_text('{"index": 0, "top": [{"strs": ["a"]}]}\n')
    with pytest.raises(UserError, match="unit 0"):
        xn.run(compose([f"run_dir={run_dir}", "features.sae=l1"]))
    assert not (run_dir / "neuronpedia" / "l1").exists()
    (run_dir / "sae" / "other").mkdir()
    (run_dir / "sae" / "other" / "cfg.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "tools.export_neuronpedia", f"run_dir={run_dir}",
                        "features.sae=other"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "tools.top_activations" in lines[0]


def test_real_features_stage_output(tmp_path):
    from tests.helpers.features import make_run as make_gpt_run
    from tests.helpers.features import overrides, records
    from tools import top_activations as ta

    run_dir, data_dir = make_gpt_run(tmp_path, n_features=8)
    cfg = overrides(run_dir, data_dir, "features.unit=neuron", "features.pages=[0]")
    ta.run(compose(cfg))
    xn.run(compose([*cfg, "+neuronpedia.batch_size=100"]))
    out = run_dir / "neuronpedia" / "neurons"
    src = {r["index"]: r for r in records(run_dir, "neurons")}
    pos = [f for b in _batches(out) for f in b["features"]]
    neg = [f for b in _batches(out / "neg") for f in b["features"]]
    assert len(pos) == len(neg) == len(src) == 32 * 4  # the GPT's MLP neurons, both sides
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["model_id"].startswith("gpt-") and settings["hook_name"] == "blocks.0.mlp.hook_post"
    for f in pos + neg:
        r = src[f["feature_index"]]
        side = r if f in pos else r["neg"]
        assert f["n_prompts_total"] > 0 and f["n_tokens_in_prompt"] == 64
        assert sum(f["freq_hist_data_bar_heights"]) == sum(side["hist"]["counts"])
        bins = [a for a in f["activations"] if a["bin_min"] != -1]
        # window values are written to ~4 significant digits of the side's peak, so a token just above
        # a bin's lower edge can be written up to half a unit of the last digit below it
        tol = 0.5e-4 * (side["max_act"] if f in pos else -side["min_act"]) + 1e-9
        assert all(a["bin_min"] <= max(a["values"][a["qualifying_token_index"]], 0) + tol for a in bins)
        shares = {(a["bin_min"], a["bin_contains"]) for a in bins}
        assert sum(c for _, c in shares) <= 1 + 1e-4
    for f in pos:  # token text and values exactly as the stage wrote them (the planted HTML included)
        r = src[f["feature_index"]]
        examples = r["top"] + [e for b in r["quantiles"] for e in b["examples"]]
        assert [a["tokens"] for a in f["activations"]] == [e["strs"] for e in examples]
        assert [a["values"] for a in f["activations"]] == [e["acts"] for e in examples]
