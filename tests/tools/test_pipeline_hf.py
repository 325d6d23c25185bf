"""End to end on a Hugging Face subject: prepare -> generate (two layers) -> SAE -> features -> describe,
through `tools.pipeline` on a tiny randomly initialised Llama saved to a folder with a real tokenizer."""

from __future__ import annotations

import json
import math

from autoencoder import shard_check
from tests.helpers.pipeline import hf_pipeline
from tools import pipeline
from tools.core.config import compose


def test_pipeline_on_a_tiny_hf_model(tmp_path, one_thread, capsys):
    cfg = compose(hf_pipeline(tmp_path))
    run = tmp_path / "run"
    results = pipeline.run(cfg)

    assert "transformer" not in results  # a pretrained subject is not trained here
    tokens = tmp_path / "data" / "local--tiny-llama"
    assert json.loads((tokens / "meta.json").read_text())["tokenizer_info"]["kind"] == "hf"
    for hook, layer in (("blocks.1.mlp.hook_post", 1), ("blocks.2.mlp.hook_post", 2)):
        m = shard_check.read_manifest(run / "activations" / "train" / hook, d_in=48)
        assert m["layer"] == layer and m["model"]["kind"] == "hf" and m["model"]["architecture"] == "llama"
    sae = results["sae"]
    assert sae["l0"] > 0 and math.isfinite(sae["loss_recovered"]) and sae["explained_variance"] > 0
    cfg_json = json.loads((run / "sae" / sae["name"] / "cfg.json").read_text())
    assert cfg_json["hook_name"] == "blocks.1.mlp.hook_post"
    for name, layer in ((sae["name"], 1), ("neurons-L0", 0), ("neurons-L2", 2)):
        meta = json.loads((run / "features" / name / "meta.json").read_text())
        assert meta["layer"] == layer, (name, meta["layer"])
        assert (run / "features" / name / "site" / "index.html").is_file()
        assert results[f"describe/{name if name != sae['name'] else 'sae'}"]["described"] > 0
    assert results["describe/neurons-L2-neg"]["described"] > 0  # act(gate)*up is signed
    first = json.loads((run / "features" / "neurons-L2" / "features.jsonl").open().readline())
    assert first["neg"]["min_act"] < 0
    # the site stage closes each unit set's steps, and pipeline.json records it
    state = json.loads((run / "pipeline.json").read_text())["stages"]
    for name, side in ((sae["name"], "sae"), ("neurons-L0", "neurons-L0"), ("neurons-L2", "neurons-L2")):
        assert state[f"site/{side}"]["site"] == str(run / "features" / name / "site" / "index.html")

    # a rerun finds every step complete
    again = pipeline.run(cfg)
    n_steps = len(pipeline.plan(cfg, pipeline.PipelineConfig(neuron_layers=[0, 2])))
    assert capsys.readouterr().out.count("complete, skipped") == n_steps
    assert again["sae"] == results["sae"]
