"""`tools.pipeline` under torchrun (2 gloo ranks on the CPU): the training, generation and features
steps run on both ranks, the others on rank 0; the neurons' feature sets are byte for byte the ones a
one-process pipeline writes (the scan merges the ranks exactly), and a rerun skips every step."""

from __future__ import annotations

import json

from tests.helpers import torchrun
from tests.helpers.pipeline import hf_pipeline
from tools import pipeline
from tools.core.config import compose


def test_pipeline_under_torchrun_writes_what_one_process_writes(tmp_path, one_thread):
    pipeline.run(compose(hf_pipeline(tmp_path, "one")))
    out = torchrun("tools.pipeline", [*hf_pipeline(tmp_path, "two"), f"hydra.run.dir={tmp_path / 'hydra'}"],
                   timeout=600)
    cfg = compose(hf_pipeline(tmp_path, "two"))
    steps = len(pipeline.plan(cfg, pipeline.PipelineConfig(neuron_layers=[0, 2])))
    assert out.count(": running ") == steps and out.count("[1/") == 1  # rank 0 alone prints the steps
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("neurons-L0", "neurons-L2"):
        assert (two / "features" / name / "features.jsonl").read_bytes() == \
            (one / "features" / name / "features.jsonl").read_bytes()
        assert (two / "features" / name / "site" / "index.html").is_file()
    m = json.loads((two / "activations" / "train" / "blocks.1.mlp.hook_post" / "manifest.json").read_text())
    assert m["world_size"] == 2
    state = json.loads((two / "pipeline.json").read_text())["stages"]
    assert state["describe/neurons-L2-neg"]["described"] > 0 and state["sae"]["l0"] > 0
    again = torchrun("tools.pipeline", [*hf_pipeline(tmp_path, "two"), f"hydra.run.dir={tmp_path / 'hydra'}"],
                     timeout=600)
    assert again.count("complete, skipped") == steps and ": running " not in again
