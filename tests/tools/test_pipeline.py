"""End to end: the demo pipeline at reduced size, its summary's figures, and a rerun that skips."""

import math

from tools import pipeline
from tools.core.config import compose

SMALL = [
    "transformer.max_steps=100", "transformer.eval_interval=50", "transformer.checkpoint_interval=50",
    "activations.contexts=512", "activations.val_contexts=128",
    "sae.n_features=1024", "sae.steps=300", "sae.resample_steps=[150]", "sae.dead_tokens=51200",
    "sae.eval_every=150", "sae.checkpoint_every=150",
    "features.contexts=128", "describe.max_units=256",
    "pipeline.sweep_l1_coeffs=[0.05,0.1]", "pipeline.llm_sample=0",
]


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    cfg = compose(["preset=demo", f"run_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}", *SMALL])
    results = pipeline.run(cfg)
    out = capsys.readouterr().out

    lm = results["transformer"]
    assert lm["val_loss"] < lm["unigram_entropy_nats"] - 0.3, lm
    for slot in ("sae/0", "sae/1"):
        sae = results[slot]
        for key in ("l0", "explained_variance", "dead_fraction", "loss_recovered"):
            assert math.isfinite(sae[key]), (slot, key, sae[key])
        assert 0 < sae["loss_recovered"] <= 1.05 and sae["l0"] > 0 and sae["explained_variance"] > 0
    # a larger L1 coefficient gives a sparser dictionary
    assert results["sae/1"]["l0"] < results["sae/0"]["l0"]
    for key in ("describe/sae/0", "describe/neurons"):
        d = results[key]
        assert d["described"] > 0
        assert d["simulation_all_mean"] > d["simulation_all_random_description_mean"] + 0.1, d
    assert results["describe/neurons-neg"]["described"] > 0  # GELU neurons' negative side
    run = tmp_path / "run"
    for name in (results["sae/0"]["name"], results["sae/1"]["name"], "neurons"):
        assert (run / "features" / name / "site" / "index.html").is_file()
        assert (run / "descriptions" / name / "descriptions.jsonl").is_file()
    assert (run / "sweep" / "index.html").is_file()
    assert "| LM val loss" in out and (run / "summary.md").read_text().startswith("| figure")

    # A rerun finds every stage complete for this config and skips it.
    again = pipeline.run(cfg)
    out = capsys.readouterr().out
    n_stages = len(pipeline.plan(cfg, pipeline.PipelineConfig(sweep_l1_coeffs=[0.5, 1.0])))
    assert out.count("complete, skipped") == n_stages, out
    assert again["transformer"] == results["transformer"]


def test_llm_sample_stages_and_comparison_table():
    cfg = compose(["preset=demo"])
    pcfg = pipeline.PipelineConfig(llm_sample=16, llm_overrides={"explain_top": 6})
    stages = {s.key: s for s in pipeline.plan(cfg, pcfg)}
    llm, base = stages["describe-llm/neurons"].overrides, stages["describe-sample/neurons"].overrides
    assert llm["describe.sample"] == base["describe.sample"] == 16  # the same units on both sides
    assert llm["describe.explain_top"] == base["describe.explain_top"] == 6  # ... and the same windows
    assert llm["describe.backend"] == "local" and base["describe.tag"] == "sample" != llm["describe.tag"]
    assert stages["describe-llm/sae"].sae_slot == "sae"
    assert "describe-llm/sae" not in {s.key for s in pipeline.plan(cfg, pipeline.PipelineConfig())}
    row = {"simulation_all_mean": 0.1234, "simulation_all_ci95": [0.05, 0.2], "simulation_all_n": 16,
           "model": "smollm2-135m-instruct", "failed_contexts": 3}
    table = pipeline.describer_table({"describe-llm/neurons": row, "describe-sample/neurons": row,
                                      "describe/neurons": row})
    lines = table.splitlines()
    assert len(lines) == 5 and "LLM smollm2-135m-instruct" in lines[2] and "0.123 [0.05, 0.20]" in lines[2]
    assert "baseline, same units" in lines[3] and lines[2].endswith("| 3 |")
    assert pipeline.describer_table({"describe/neurons": row}) == ""


def test_plan_lists_stage_classes_and_ends_each_unit_set_with_its_site():
    from tools.describe.stage import DescribeStage
    from tools.site import SiteStage
    from tools.top_activations import FeaturesStage

    cfg = compose(["preset=demo"])
    steps = pipeline.plan(cfg, pipeline.PipelineConfig(sweep_l1_coeffs=[0.05, 0.1], llm_sample=4))
    keys = [s.key for s in steps]
    assert len(set(keys)) == len(keys)
    for side in ("sae/0", "sae/1", "neurons"):
        site = keys.index(f"site/{side}")
        runs = [i for i, k in enumerate(keys) if k.partition("/")[2] in (side, f"{side}-neg")
                and k.partition("/")[0] in ("features", "describe", "describe-sample", "describe-llm")]
        assert len(runs) >= 4 and max(runs) < site and keys[site + 1:site + 2] != [f"describe/{side}"]
        assert steps[site].stage is SiteStage and steps[site].overrides == steps[runs[0]].overrides
    assert steps[keys.index("site/sae/1")].sae_slot == "sae/1"
    assert {s.stage for s in steps if s.key.startswith("describe")} == {DescribeStage}
    assert steps[keys.index("features/neurons")].stage is FeaturesStage
    # the site steps add no rows of their own to the summary table
    row = {"seconds": 1.0, "site": "/run/features/neurons/site/index.html"}
    table = pipeline.summary_table({"features/neurons": row, "site/neurons": row})
    assert "site/neurons" not in table and table.count("feature browser") == 1
