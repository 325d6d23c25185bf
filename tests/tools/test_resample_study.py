"""The resampling study's rows come from its preset, and its table reads the runs' cfg.json."""

from __future__ import annotations

import json

from tools.core.config import compose, section
from tools.resample_study import StudyConfig, study_rows, table


def test_rows_cover_the_grid_and_extras_and_table_reads_results(tmp_path):
    cfg = compose(["preset=resample_study", f"run_dir={tmp_path}"])
    rows = study_rows(section(cfg, "study", StudyConfig))
    names = [n for n, _ in rows]
    assert len(set(names)) == len(names) == 8 + len(cfg.study.extra)
    assert names[:2] == ["lr0.001-l1c0.1-resample", "lr0.001-l1c0.1-none"]  # the collapse setting first
    assert "sae.resample_steps=[]" in dict(rows)["lr0.0003-l1c0.05-none"]
    raw = dict(rows)["paper-raw-l1c1"]
    assert [o for o in raw if o.startswith("sae.l1_coeff=")] == ["sae.l1_coeff=1.0"]  # the row's own λ
    assert cfg.sae.n_features == 1024 and cfg.sae.resample_steps == [250, 500, 750]
    out = tmp_path / "sae" / "study-lr0.001-l1c0.1-resample"
    out.mkdir(parents=True)
    event = {"step": 250, "count": 3, "dead": 3, "alive_before": 1021, "revived": 3, "survived": 1021,
             "new_density": 0.1, "new_recon_ratio": 0.5}
    (out / "cfg.json").write_text(json.dumps({
        "metrics": {"sparsity/dead_fraction": 0.125, "metrics/l0": 20.0, "metrics/explained_variance": 0.95},
        "training": {"resampled": [event]}}))
    text = table(rows, tmp_path)
    assert "| lr0.001-l1c0.1-resample | lr=0.001 l1_coeff=0.1 | 12.5% | 20.0 | 0.950 | n/a | 250: 3→3, " \
           "1021→1021 (new fire on 10%, add 0.50×‖x̄‖) |" in text
    assert "| lr0.001-l1c0.1-none | lr=0.001 l1_coeff=0.1 resample_steps=[] | not run |" in text


def test_the_study_section_is_required():
    import pytest

    from tools.core.config import UserError

    with pytest.raises(UserError, match="study.grid"):
        section(compose([]), "study", StudyConfig)
