"""tools/bench/frontier: run names, the Markdown table, the PNG, and bad options."""

from __future__ import annotations

import math

import pytest

from tools.bench import frontier


def test_runs_cover_every_architecture_and_sparsity():
    a, extra = frontier.parse_args(["--ks", "16,32", "--l1-coeffs", "0.1", "--l0-coeffs", "1e-3",
                                    "sae.seed=3"])
    assert extra == ["sae.seed=3"]
    names = frontier.runs(a)
    assert [n for _, _, n in names] == [
        "frontier-l1-l1c0.1", "frontier-topk-k16", "frontier-topk-k32", "frontier-batchtopk-k16",
        "frontier-batchtopk-k32", "frontier-jumprelu-l0c1e-3", "frontier-matryoshka-k16",
        "frontier-matryoshka-k32"]
    assert ("jumprelu", "sae.l0_coeff=1e-3", "frontier-jumprelu-l0c1e-3") in names


def test_bad_architecture_is_refused():
    with pytest.raises(SystemExit) as e:
        frontier.parse_args(["--archs", "topk,gated"])
    assert e.value.code == 2


def test_table_and_plot(tmp_path):
    results = [{"arch": "topk", "setting": f"k={k}", "name": f"t{k}", "l0": float(k), "fvu": 0.5 / k,
                "dead_fraction": 0.02, "loss_recovered": 0.97} for k in (16, 32)]
    results.append({"arch": "matryoshka", "setting": "k=32", "name": "m", "l0": 31.0, "fvu": 0.02,
                    "dead_fraction": 0.0, "loss_recovered": math.nan, "prefix_fvu": {128: 0.3, 2048: 0.02}})
    md = frontier.table(results)
    assert md.count("\n") == 5 and "| topk | k=16 | 16.0 | 0.0312 | 2.0% | 0.970 |" in md
    assert "128: 0.3000, 2048: 0.0200" in md
    frontier.plot(results, tmp_path / "f.png", "title")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
