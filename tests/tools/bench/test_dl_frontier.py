"""tools/bench/dl_frontier: dictionary_learning's trainers run a few steps on tiny planted shards, each
folder loads in dictionary_learning and in our loader alike, and the table has one finite row per SAE."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.helpers.frontier import read_frontier, tiny_budget
from tests.helpers.planted import planted_run
from tools.bench import dl_frontier


@pytest.fixture
def dl_trainers():
    """dictionary_learning's trainer modules (its torch/einops part); sys.modules as it was afterwards."""
    if importlib.util.find_spec("dictionary_learning") is None:
        pytest.skip("dictionary-learning is not installed (pip install --no-deps dictionary-learning)")
    pytest.importorskip("einops", reason="dictionary_learning's trainers need einops")
    saved = {k: v for k, v in sys.modules.items() if k.startswith("dictionary_learning")}
    try:
        yield {arch: sys.modules[dl_frontier.trainer_class(arch).__module__] for arch in dl_frontier.ARCHS}
    finally:
        for k in [k for k in sys.modules if k.startswith("dictionary_learning")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_runs_and_bad_architecture():
    a, extra = dl_frontier.parse_args(["--ks", "8,16", "sae.seed=3"])
    assert extra == ["sae.seed=3"]
    assert [s for _, s, _ in dl_frontier.runs(a)] == ["k=8", "k=16"] * 3 + ["target_l0=8", "target_l0=16"]
    assert [n for _, _, n in dl_frontier.runs(a)][-3:] == ["matryoshka-k16", "jumprelu-k8", "jumprelu-k16"]
    a, _ = dl_frontier.parse_args(["--archs", "topk", "--ks", "4", "--set", "auxk_alpha=0.5"])
    assert dl_frontier.runs(a) == [("topk", "k=4, auxk_alpha=0.5", "topk-k4-auxk_alpha0.5")]
    with pytest.raises(SystemExit) as e:
        dl_frontier.parse_args(["--archs", "topk,gated"])
    assert e.value.code == 2
    assert dl_frontier.group_fractions([128, 512, 2048]) == [1 / 16, 3 / 16, 3 / 4]


def test_missing_dictionary_learning_is_one_line(monkeypatch, capsys):
    for name in [k for k in sys.modules if k.startswith("dictionary_learning")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dictionary_learning", None)
    with pytest.raises(SystemExit) as e:
        dl_frontier.main(["--archs", "topk", "run_dir=/nonexistent"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_four_trainers_train_save_and_score(tmp_path, capsys, one_thread, dl_trainers):
    from autoencoder.dictionaries import load_dictionary

    run_dir = tmp_path / "run"
    planted_run(run_dir, rows=3000)
    common = ["--ks", "4", *tiny_budget(run_dir)]
    # the inference threshold of BatchTopK and Matryoshka starts after threshold_start_step (1,000 by default)
    dl_frontier.main(["--archs", "topk,batchtopk,matryoshka", "--set", "threshold_start_step=2", *common])
    dl_frontier.main(["--archs", "jumprelu", *common])
    dl_frontier.main(["--eval-all", *common])
    _, rows, md = read_frontier(run_dir / "frontier", "frontier-dictionary-learning")
    assert list(rows) == list(dl_frontier.ARCHS)
    assert rows["topk"]["l0"] == 4
    assert md.count("\n") == 6 and "| topk | k=4, threshold_start_step=2 |" in md
    assert "| jumprelu | target_l0=4 |" in md
    cfg = json.loads((run_dir / "dictionary_learning" / "matryoshka-k4-threshold_start_step2" /
                      "config.json").read_text())["trainer"]
    assert cfg["group_sizes"] == [4, 12, 48] and cfg["auxk_alpha"] == 1 / 32 and cfg["lr"] == 3e-3
    # dictionary_learning's own classes open the same folders and encode the same rows alike
    x = torch.randn(32, 16)
    own = {"topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE", "matryoshka": "MatryoshkaBatchTopKSAE"}
    for arch, cls in own.items():
        folder = run_dir / "dictionary_learning" / rows[arch]["name"]
        theirs = getattr(dl_trainers[arch], cls).from_pretrained(str(folder / "ae.pt"))
        ours = load_dictionary(folder)
        assert ours.source_format == "dictionary_learning" and ours.meta["trainer_class"].endswith("Trainer")
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), theirs.encode(x))
            torch.testing.assert_close(ours(x), theirs(x))
    jr = load_dictionary(run_dir / "dictionary_learning" / "jumprelu-k4")
    theirs = dl_trainers["jumprelu"].JumpReluAutoEncoder(16, 64)
    theirs.load_state_dict(torch.load(run_dir / "dictionary_learning" / "jumprelu-k4" / "ae.pt"))
    with torch.no_grad():
        torch.testing.assert_close(jr.encode(x), theirs.encode(x))
    assert capsys.readouterr().out.count("arch=") == 8
    # an argument the trainer does not take is one line, exit 2
    with pytest.raises(SystemExit) as e:
        dl_frontier.main(["--archs", "topk", "--set", "no_such_argument=1", *common])
    assert e.value.code == 2 and "no_such_argument" in capsys.readouterr().err.strip().splitlines()[-1]
