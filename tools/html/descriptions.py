"""Every description run of one unit set, for the site.

The describe stage writes `descriptions/<name>[-neg][-<tag>]/` (descriptions.jsonl + summary.json).
A folder belongs to the unit set `<name>` when its summary.json says so (`name`, and `tag` fixing
the exact folder name), so `neurons-L10` (another unit set) or a tag that looks like one is never
mixed in. Without a summary (a run still in progress) only `<name>` and a `<name>-neg` whose records
say `polarity: neg` count. Everything here is model output or derived from it: strings pass through
`visible` and are cut to a bounded length, numbers are kept only when finite.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.core.layout import RunLayout, describe_polarity
from tools.describe.records import FILE, read_records

SCORE_KEYS = ("simulation_all", "simulation_top", "detection_auc")  # shown on the pages
CONTROLS = ("random_description", "shuffled_tokens")
MAX_DESC = 1000  # characters of a description shown (an LLM's output is bounded, but not by us)
MAX_REASON = 300


@dataclass
class Run:
    """One description folder of a unit set."""

    folder: str
    polarity: str  # pos | neg
    tag: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def primary(self) -> bool:
        """The untagged positive run: the index's description column."""
        return self.polarity == "pos" and self.tag is None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        v = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def match(folder: str, name: str, summary: dict[str, Any]) -> tuple[str, str | None] | None:
    """(polarity, tag) when `folder` is a description run of unit set `name` by its summary, else None."""
    if summary.get("name") != name:
        return None
    tag = summary.get("tag")
    if tag is not None and not isinstance(tag, str):
        return None
    polarity = describe_polarity(folder, name, tag)
    return None if polarity is None else (polarity, tag)


def find_runs(run_dir: Path, name: str) -> list[Run]:
    """Every description run of unit set `name`: the untagged positive one first, then by tag and side."""
    runs = []
    for d in RunLayout(Path(run_dir)).description_candidates(name):
        summary = _read_json(d / "summary.json")
        if "name" in summary:
            m = match(d.name, name, summary)
            if m is None:
                continue
            runs.append(Run(d.name, m[0], m[1], summary, read_records(d / FILE)))
            continue
        pol = describe_polarity(d.name, name)  # no summary yet: only the two untagged folders
        if pol is None:
            continue
        recs = read_records(d / FILE)
        if pol == "neg" and not (recs and all(r.get("polarity") == "neg" for r in recs.values())):
            continue
        runs.append(Run(d.name, pol, None, {}, recs))
    return sorted(runs, key=lambda r: (r.tag is not None, r.tag or "", r.polarity != "pos"))


def _clip(s: Any, n: int) -> str:
    from tools.tokens import visible

    v = visible(str(s or ""))  # bidi overrides and controls shown, not obeyed
    return v if len(v) <= n else v[:n] + "…"


def _nums(d: Any, keys: tuple[str, ...] | None = None) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    return {str(k): v for k, v in d.items() if (keys is None or k in keys) and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def who(run: Run, rec: dict[str, Any] | None = None) -> dict[str, str]:
    """Explainer, simulator and model of a run (a record's own fields win over the summary's)."""
    src = {**run.summary, **(rec or {})}
    model = _clip(src.get("model"), 120)
    expl, sim = _clip(src.get("explainer"), 40), _clip(src.get("simulator"), 40)
    return {"explainer": expl + (f" ({model})" if expl == "llm" and model else ""),
            "simulator": sim + (f" ({model})" if sim == "llm" and model else "")}


def unit_view(run: Run, rec: dict[str, Any]) -> dict[str, Any]:
    """One description of one unit as the page shows it."""
    controls = rec.get("controls") if isinstance(rec.get("controls"), dict) else {}
    ctrl = {c: _nums(controls.get(c), SCORE_KEYS) for c in CONTROLS}
    rd = controls.get("random_description")
    frm = rd.get("from") if isinstance(rd, dict) else None
    return {"run": _clip(run.folder, 200), "side": run.polarity, "tag": _clip(run.tag, 100) or None,
            **who(run, rec), "status": _clip(rec.get("status"), 20),
            "mode": _clip(rec.get("simulator_mode"), 40),
            "description": _clip(rec.get("description"), MAX_DESC),
            "reason": _clip(rec.get("reason"), MAX_REASON), "scores": _nums(rec.get("scores"), SCORE_KEYS),
            "controls": {c: v for c, v in ctrl.items() if v},
            "control_from": frm if isinstance(frm, int) and not isinstance(frm, bool) else None}


def unit_views(runs: list[Run], u: int) -> list[dict[str, Any]]:
    return [unit_view(r, r.records[u]) for r in runs if u in r.records]


def _stat(s: Any) -> dict[str, Any] | None:
    if not isinstance(s, dict):
        return None
    ci = s.get("ci95")
    ci = [float(x) for x in ci] if isinstance(ci, list) and len(ci) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in ci) else None
    return {**_nums(s, ("mean", "median", "n")), "ci95": ci}


def run_view(run: Run) -> dict[str, Any]:
    """A run's row in the index's table of description runs (means from summary.json)."""
    s = run.summary
    statuses = [r.get("status") for r in run.records.values()]
    n = _nums(s, ("units", "described", "failed", "skipped"))
    counts = {k: int(n[k]) if k in n else sum(x == st for x in statuses)
              for k, st in (("described", "ok"), ("failed", "failed"), ("skipped", "skipped"))}
    counts["units"] = int(n.get("units", len(statuses)))
    scores = s.get("scores") if isinstance(s.get("scores"), dict) else {}
    controls = s.get("controls") if isinstance(s.get("controls"), dict) else {}
    return {"run": _clip(run.folder, 200), "side": run.polarity, "tag": _clip(run.tag, 100) or None,
            **who(run), **counts, "complete": s.get("complete") is True,
            "modes": _clip(", ".join(map(str, s["simulator_modes"])), 200)
            if isinstance(s.get("simulator_modes"), dict) else "",
            "scores": {k: _stat(scores.get(k)) for k in SCORE_KEYS},
            "controls": {c: {k: _stat((controls.get(c) or {}).get(k)) for k in SCORE_KEYS}
                         for c in CONTROLS if isinstance(controls.get(c), dict)}}


def short_label(run: Run) -> str:
    """A chip for the index: the run's side and tag ("neg", "llm", "neg-llm"; "" for the primary run)."""
    return _clip("-".join((["neg"] if run.polarity == "neg" else []) + ([run.tag] if run.tag else [])), 80)
