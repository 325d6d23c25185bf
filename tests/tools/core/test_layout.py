"""The run folder's names both ways: unit sets, describe folders, activations in either layout."""

from __future__ import annotations

import json

import pytest

from tools.core.config import UserError
from tools.core.layout import RunLayout, describe_folder, describe_polarity, neurons_layer, neurons_name


def test_neuron_unit_sets_round_trip():
    assert neurons_name(0) == "neurons" and neurons_name(3) == "neurons-L3"
    assert neurons_name(0, gpt=False) == "neurons-L0"
    for layer in (0, 1, 10, 31):
        for gpt in (True, False):
            assert neurons_layer(neurons_name(layer, gpt), gpt) == layer
    for other in ("l1", "neurons-L", "neurons-Lx", "neurons-L03", "neurons-neg", "neurons-L3-llm"):
        assert neurons_layer(other) is None
    assert neurons_layer("neurons", gpt=False) is None


def test_describe_folders_round_trip():
    assert describe_folder("l1") == "l1"
    assert describe_folder("l1", "neg") == "l1-neg"
    assert describe_folder("neurons", "pos", "llm") == "neurons-llm"
    assert describe_folder("neurons-L10", "neg", "sample") == "neurons-L10-neg-sample"
    for name in ("l1", "neurons", "neurons-L10", "a-neg"):
        for tag in (None, "llm", "neg", "x-y"):
            for pol in ("pos", "neg"):
                assert describe_polarity(describe_folder(name, pol, tag), name, tag) == pol
    # another unit set, or the same folder read under another tag, is not a run of this one
    assert describe_polarity("neurons-L10", "neurons") is None
    assert describe_polarity("neurons-llm", "neurons", None) is None
    assert describe_polarity("neurons-neg-llm", "neurons", "sample") is None
    with pytest.raises(UserError, match="polarity"):
        describe_folder("l1", "both")


def test_paths(tmp_path):
    lay = RunLayout(tmp_path)
    assert lay.transformer == tmp_path / "transformer"
    assert lay.transformer_checkpoint == tmp_path / "transformer" / "checkpoint"
    assert lay.sae("l1") == tmp_path / "sae" / "l1"
    assert lay.features("neurons") == tmp_path / "features" / "neurons"
    assert lay.site("neurons") == tmp_path / "features" / "neurons" / "site"
    assert lay.descriptions("neurons", "neg", "llm") == tmp_path / "descriptions" / "neurons-neg-llm"
    assert lay.pipeline_state == tmp_path / "pipeline.json" and lay.summary == tmp_path / "summary.md"
    assert lay.logs("a", "b.log") == tmp_path / "logs" / "a" / "b.log"


def test_unit_set_and_sae_names(tmp_path):
    lay = RunLayout(tmp_path)
    assert lay.unit_set("neuron", layer=2) == "neurons-L2"
    with pytest.raises(UserError, match="no SAE found"):
        lay.unit_set("sae")
    for name in ("b", "a"):
        lay.sae(name).mkdir(parents=True)
        (lay.sae(name) / "cfg.json").write_text("{}")
    (tmp_path / "sae" / "unfinished").mkdir()
    assert lay.sae_names() == ["a", "b"]
    with pytest.raises(UserError, match="several SAEs"):
        lay.unit_set("sae")
    assert lay.unit_set("sae", sae="b") == "b"
    with pytest.raises(UserError, match=r"features.sae='c'.*SAEs there: \['a', 'b'\]"):
        lay.unit_set("sae", sae="c")


def test_activations_in_either_layout(tmp_path):
    lay = RunLayout(tmp_path)
    one = lay.activation_hook_dirs("train", ["blocks.0.mlp.hook_post"])
    assert one == {"blocks.0.mlp.hook_post": tmp_path / "activations" / "train"}
    hooks = ["blocks.0.mlp.hook_post", "blocks.2.mlp.hook_post"]
    several = lay.activation_hook_dirs("val", hooks)
    assert several == {h: tmp_path / "activations" / "val" / h for h in hooks}
    for h, d in [*one.items(), *several.items()]:
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_text(json.dumps({"hook_name": h}))
    assert lay.activations("train") == tmp_path / "activations" / "train"
    assert lay.activations("train", hooks[0]) == tmp_path / "activations" / "train"
    assert lay.activations("val", hooks[1]) == several[hooks[1]]
    with pytest.raises(UserError, match=r"no activations of blocks.5.mlp.hook_post .*found: blocks.0"):
        lay.activations("val", "blocks.5.mlp.hook_post")


def test_of_config():
    from tools.core.config import compose

    lay = RunLayout.of(compose(["run_dir=/tmp/r", "data_dir=/tmp/d"]))
    assert lay.run_dir.as_posix() == "/tmp/r" and lay.data_dir.as_posix() == "/tmp/d"
