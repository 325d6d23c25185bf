"""tools/bench/saelens_frontier: SAELens's four trainers run a few steps on tiny planted shards, each
folder loads in SAELens and in our loader alike, and the table has one finite row per SAE."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.helpers.frontier import read_frontier, tiny_budget
from tests.helpers.planted import planted_run
from tools.bench import saelens_frontier


def test_runs_and_bad_architecture():
    a, extra = saelens_frontier.parse_args(["--ks", "8", "--l0-coeffs", "0.1,0.2", "sae.seed=3"])
    assert extra == ["sae.seed=3"]
    assert [n for _, _, n in saelens_frontier.runs(a)] == [
        "topk-k8", "batchtopk-k8", "matryoshka-k8", "jumprelu-l0c0.1", "jumprelu-l0c0.2"]
    a, _ = saelens_frontier.parse_args(["--archs", "jumprelu", "--l0-coeffs", "0.1", "--set",
                                        "jumprelu_init_threshold=0.1"])
    assert saelens_frontier.runs(a) == [("jumprelu", "l0_coefficient=0.1, jumprelu_init_threshold=0.1",
                                         "jumprelu-l0c0.1-jumprelu_init_threshold0.1")]
    with pytest.raises(SystemExit) as e:
        saelens_frontier.parse_args(["--archs", "topk,gated"])
    assert e.value.code == 2


def test_missing_sae_lens_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(SystemExit) as e:
        saelens_frontier.sae_lens_module()
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_four_kinds_train_save_and_score(tmp_path, capsys, one_thread):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e .[compat])")
    from autoencoder.dictionaries import load_dictionary

    run_dir = tmp_path / "run"
    planted_run(run_dir, rows=3000)
    common = tiny_budget(run_dir)
    saelens_frontier.main(["--ks", "4", "--l0-coeffs", "0.01", *common])
    got, rows, md = read_frontier(run_dir / "frontier", "frontier-saelens")
    assert sorted(rows) == sorted(saelens_frontier.ARCHS)
    assert md.count("\n") == 6 and "| topk | k=4 |" in md
    assert capsys.readouterr().out.count("arch=") == 4
    # --eval-all finds the same SAEs from their folders and scores them alike
    saelens_frontier.main(["--eval-all", "--out", str(tmp_path / "again"), *common])
    again = json.loads((tmp_path / "again" / "frontier-saelens.json").read_text())["results"]
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, got["results"]))
    x = torch.randn(32, 16)
    for r in got["results"]:
        folder = run_dir / "saelens" / r["name"]
        theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
        ours = load_dictionary(folder)
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), theirs.encode(x))
