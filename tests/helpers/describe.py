"""Synthetic feature sets for the describe stage (planted rules) and its config."""

from __future__ import annotations

import json
from pathlib import Path

from tools.core.config import compose
from tools.describe.synthetic import fires_after, fires_on, fires_randomly, write_features

RULES = [fires_on(" thou"), fires_randomly(), fires_after(" the"), fires_on(" king")]


def make_sae_folder(run_dir: Path, name: str = "l1") -> None:
    """What tools.top_activations.unit_name looks for to find the SAE's name."""
    (run_dir / "sae" / name).mkdir(parents=True, exist_ok=True)
    (run_dir / "sae" / name / "cfg.json").write_text("{}")


def make_run(tmp_path: Path, rules=RULES, name: str = "l1", **kw) -> Path:
    write_features(tmp_path, name, rules, extra={" thou": 0.04}, **kw)
    make_sae_folder(tmp_path, name)
    return tmp_path


def cfg_for(run_dir: Path, *overrides: str):
    return compose([f"run_dir={run_dir}", "describe.site=false", *overrides])


def read_lines(run_dir: Path, name: str = "l1") -> list[dict]:
    path = run_dir / "descriptions" / name / "descriptions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
