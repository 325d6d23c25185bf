"""Several unit sets in one pass (neuron layers of our GPT and of a tiny HF Llama, several SAEs) equal
their one-set runs byte for byte; 2 gloo ranks equal one process; memory grouping; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from autoencoder.sae import save_sae
from autoencoder.saes import SAEModelConfig, build_sae
from tests.helpers import ROOT, torchrun
from tests.helpers.features import make_run, overrides
from tests.helpers.subjects import tiny_llama_folder
from tools import top_activations as ta
from tools.core.config import UserError, compose
from tools.features import memory
from transformer.model import GPT, GPTConfig, save_model

SMALL = ("features.unit=neuron", "features.n_random=3", "features.negative_candidates=16", "features.top_k=5",
         "features.pages=[0]", "features.unit_chunk=40", "features.batch_tokens=384")


def _gpt_run(root: Path) -> tuple[Path, Path]:
    """make_run's tiny GPT with 3 layers and a second SAE on layer 2."""
    run_dir, data_dir = make_run(root, n_features=16)
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=64, n_embd=32, n_head=2, n_layer=3, vocab_size=50304))
    save_model(model, run_dir / "transformer")
    sae = build_sae(SAEModelConfig(architecture="standard", d_in=model.config.d_mlp, d_sae=12,
                                   hook_name="blocks.2.mlp.hook_post"))
    save_sae(sae, run_dir / "sae" / "sae_l2")
    return run_dir, data_dir


def _outputs(run_dir: Path) -> dict[str, tuple[bytes, dict]]:
    """Each feature set's features.jsonl bytes and meta.json without its timing figure."""
    out = {}
    for d in sorted((run_dir / "features").iterdir()):
        meta = json.loads((d / "meta.json").read_text())
        meta.pop("scan_tokens_per_s")
        meta.pop("inputs")
        if meta.get("dictionary"):  # where the run folder is
            meta["dictionary"].pop("source")
        out[d.name] = ((d / "features.jsonl").read_bytes(), meta)
        assert (d / "site" / "index.html").is_file()
    return out


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The one-layer runs of layers 0 and 2, one at a time (the reference)."""
    run_dir, data_dir = _gpt_run(tmp_path_factory.mktemp("onepass"))
    for layer in (0, 2):
        ta.run(compose(overrides(run_dir, data_dir, *SMALL, f"features.layer={layer}")))
    return run_dir, data_dir, _outputs(run_dir)


def _fresh(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run without its feature sets."""
    new = tmp_path / "run"
    shutil.copytree(run_dir, new, ignore=shutil.ignore_patterns("features"))
    return new


def test_gpt_layers_in_one_pass_equal_one_layer_runs(gpt, tmp_path, capsys):
    run_dir, data_dir, want = gpt
    assert set(want) == {"neurons", "neurons-L2"}
    new = _fresh(run_dir, tmp_path)
    result = ta.run(compose(overrides(new, data_dir, *SMALL, "features.layers=[0,2]")))
    assert set(result["sets"]) == {"neurons", "neurons-L2"}
    assert "2 unit set(s) in 1 pass(es)" in capsys.readouterr().out
    got = _outputs(new)
    for name in want:
        assert got[name][0] == want[name][0], name
        assert got[name][1] == want[name][1], name
    # every set current: a rerun scans nothing
    cfg = compose(overrides(new, data_dir, *SMALL, "features.layers=[0,2]"))
    assert ta.done(cfg)
    ta.run(cfg)
    assert "up to date" in capsys.readouterr().out


def test_memory_budget_groups_sets_into_passes(gpt, tmp_path, capsys):
    run_dir, data_dir, want = gpt
    new = _fresh(run_dir, tmp_path)
    fc = compose(overrides(new, data_dir, *SMALL))
    from tools.core.config import section
    from tools.features.config import FeaturesConfig

    c = section(fc, "features", FeaturesConfig)
    held, work = memory.set_bytes(128, 128, c, 80, 64, True)
    budget = (1.5 * held + work) / memory.GB  # one set fits, two do not
    ta.run(compose(overrides(new, data_dir, *SMALL, "features.layers=[0,2]", f"features.memory_gb={budget}")))
    assert "2 unit set(s) in 2 pass(es)" in capsys.readouterr().out
    got = _outputs(new)
    assert all(got[n][0] == want[n][0] for n in want)
    with pytest.raises(UserError, match=r"features.memory_gb=.* too small: one unit set \(neurons\) needs"):
        ta.run(compose(overrides(_fresh(run_dir, tmp_path / "b"), data_dir, *SMALL, "features.layers=[0,2]",
                                 "features.memory_gb=0.00001")))
    assert memory.plan_passes(["a", "b", "c"], [(4, 2), (4, 2), (4, 2)], 10) == [[0, 1], [2]]


def test_several_saes_share_the_forward(gpt, tmp_path):
    run_dir, data_dir, _ = gpt
    extra = ("features.pages=[0]", "features.top_k=5", "features.n_random=3")
    one = _fresh(run_dir, tmp_path / "one")
    for name in ("tiny_sae", "sae_l2"):
        ta.run(compose(overrides(one, data_dir, *extra, f"features.sae={name}")))
    both = _fresh(run_dir, tmp_path / "both")
    ta.run(compose(overrides(both, data_dir, *extra, "features.sae=[tiny_sae,sae_l2]")))
    a, b = _outputs(one), _outputs(both)
    assert set(a) == set(b) == {"tiny_sae", "sae_l2"} and a == b


def test_hf_llama_layers_in_one_pass_equal_one_layer_runs(tmp_path):
    """The same on a tiny random Hugging Face Llama (signed act(gate)*up neurons: both sides)."""
    from transformer import prepare

    model = tiny_llama_folder(tmp_path / "tiny-llama")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    plays = sorted((ROOT / "transformer" / "assets" / "shakespeare").glob("*.md"))[:2]
    for p in plays:
        (corpus / f"{p.stem}.txt").write_text(p.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    base = [f"data_dir={tmp_path / 'data'}", "device=cpu", "wandb.mode=disabled", "subject=hf",
            f"subject.model={model}", "data=local", f"data.files={corpus}/*.txt", "data.val_fraction=0.5",
            "data.num_proc=1", "features.contexts=24", "features.context_len=32", *SMALL]
    prepare.run(compose(base))
    one, both = tmp_path / "one", tmp_path / "both"
    for layer in (0, 2):
        ta.run(compose([*base, f"run_dir={one}", f"features.layer={layer}"]))
    ta.run(compose([*base, f"run_dir={both}", "features.layers=[0,2]"]))
    a, b = _outputs(one), _outputs(both)
    assert set(a) == {"neurons-L0", "neurons-L2"} and a == b
    first = json.loads((both / "features" / "neurons-L2" / "features.jsonl").open().readline())
    assert first["neg"]["min_act"] < 0


def test_bad_layers_and_budget(gpt):
    run_dir, data_dir, _ = gpt
    with pytest.raises(UserError, match=r"features.layers.*\[7\] do not exist.*3 layers \(0..2\)"):
        ta.run(compose(overrides(run_dir, data_dir, *SMALL, "features.layers=[0,7]")))
    with pytest.raises(UserError, match="features.layers must be"):
        ta.run(compose(overrides(run_dir, data_dir, *SMALL, "features.layers=some")))
    with pytest.raises(UserError, match="features.layers lists neuron layers"):
        ta.run(compose(overrides(run_dir, data_dir, "features.layers=[0]")))
    with pytest.raises(UserError, match="features.memory_gb must be > 0"):
        ta.run(compose(overrides(run_dir, data_dir, *SMALL, "features.memory_gb=0")))


def test_two_gloo_ranks_equal_one_process(gpt, tmp_path):
    run_dir, data_dir, want = gpt
    new = _fresh(run_dir, tmp_path)
    out = torchrun("tools.top_activations", overrides(new, data_dir, *SMALL, "features.layers=[0,2]",
                              f"hydra.run.dir={tmp_path / 'hydra'}"))
    assert "2 ranks" in out
    got = _outputs(new)
    for name in want:
        assert got[name][0] == want[name][0], name
        assert got[name][1] == want[name][1], name
    assert ta.done(compose(overrides(new, data_dir, *SMALL, "features.layers=[0,2]")))
