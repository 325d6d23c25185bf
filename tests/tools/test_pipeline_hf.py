"""End to end on a Hugging Face subject: prepare -> generate (two layers) -> SAE -> features -> describe,
through `tools.pipeline` on a tiny randomly initialised Llama saved to a folder with a real tokenizer."""

from __future__ import annotations

import json
import math

from autoencoder import shard_check
from tests.helpers import ROOT
from tests.helpers.subjects import tiny_llama_folder
from tools import pipeline
from tools.core.config import compose

PLAYS = ROOT / "transformer" / "assets" / "shakespeare"


def test_pipeline_on_a_tiny_hf_model(tmp_path, one_thread, capsys):
    model = tiny_llama_folder(tmp_path / "tiny-llama")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in sorted(PLAYS.glob("*.md"))[:6]:
        (corpus / f"{p.stem}.txt").write_text(p.read_text(encoding="utf-8")[:12000], encoding="utf-8")
    run = tmp_path / "run"
    cfg = compose([
        f"run_dir={run}", f"data_dir={tmp_path / 'data'}", "device=cpu", "wandb.mode=disabled",
        "subject=hf", f"subject.model={model}", "data=local", f"data.files={corpus}/*.txt",
        "data.val_fraction=0.34", "data.num_proc=1",
        "activations.contexts=64", "activations.val_contexts=16", "activations.tokens_per_context=8",
        "activations.block_size=32", "activations.layers=[1,2]", "activations.rows_per_shard=256",
        "activations.resample_rows=128", "activations.batch_contexts=16",
        "sae.hook=blocks.1.mlp.hook_post", "sae.n_features=96", "sae.batch_size=64", "sae.steps=40",
        "sae.resample_steps=[20]", "sae.dead_tokens=640", "sae.eval_every=20", "sae.checkpoint_every=20",
        "sae.eval_contexts=4", "sae.eval_context_len=32", "sae.eval_rows=128", "sae.b_dec_init_rows=256",
        "sae.log_every=10", "sae.lr_warmup_steps=5", "sae.kernel=dense",
        "features.contexts=24", "features.context_len=32", "features.window=4", "features.top_k=4",
        "features.per_bin=1", "features.n_random=3", "features.n_uniform=3",
        "features.negative_candidates=16", "features.logit_k=3",
        "pipeline.neuron_layers=[0,2]", "pipeline.llm_sample=0",
    ])
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
