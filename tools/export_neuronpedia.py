"""Export a feature set and its description runs for Neuronpedia.

    python -m tools.export_neuronpedia run_dir=runs/demo features.sae=l1
    python -m tools.export_neuronpedia run_dir=runs/demo features.unit=neuron features.layer=0 \
        +neuronpedia.model_id=gpt-demo

Reads `features/<name>/{features.jsonl, meta.json}` and every description run of the unit set
(`descriptions/<name>[-neg][-<tag>]/`), and writes `neuronpedia/<name>/` (docs/formats.md,
"Neuronpedia export"): SAEDashboard's `batch-N.json` feature records, and Neuronpedia's bulk-import
folder `import/<model_id>/<source_id>/` with the descriptions as explanations. A signed unit's
negative side is exported as the negated unit, in `neg/` and the source `<source_id>__neg`. The
folder is built beside its place and renamed into it whole, under the folder's lock.

Optional settings (`+neuronpedia.<key>=...`; `NeuronpediaConfig`): `model_id`, `source_set`,
`creator_id`, `creator_name`, `description`, `dataset`, `batch_size`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tools.core import guard
from tools.core.config import UserError, section, stage_main
from tools.core.files import read_json
from tools.core.layout import RunLayout
from tools.features.config import unit_name
from tools.features.records import features_path, iter_records
from tools.html.descriptions import Run, find_runs
from tools.neuronpedia import bulk
from tools.neuronpedia.records import SIDES, active, clean, feature

FORMAT = "monosemantic.neuronpedia/1"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SCORES = ("simulation_all", "simulation_top", "detection_auc")


@dataclass
class NeuronpediaConfig:
    model_id: str | None = None  # Neuronpedia's model id; null = from the subject (gpt-<run_dir name>)
    source_set: str | None = None  # the source set (SAE set) name; null = the unit set's name
    creator_id: str = bulk.DEFAULT_CREATOR_ID  # a Neuronpedia user id (default: its seeded default user)
    creator_name: str = "monosemantic"
    description: str | None = None  # the release's and source set's description; null = generated
    dataset: str = ""  # the scanned text's name, shown as the source's dataset
    batch_size: int = 128  # features per batch file

    def check(self) -> NeuronpediaConfig:
        if self.batch_size < 1:
            raise UserError(f"neuronpedia.batch_size must be >= 1, got {self.batch_size}")
        for key in ("model_id", "source_set"):
            v = getattr(self, key)
            if v is not None and not _ID.match(v):
                raise UserError(f"neuronpedia.{key}={v!r}: expected letters, digits, `.`, `_` or `-` "
                                "(it becomes a folder name and a Neuronpedia id)")
        return self


def _default_model_id(cfg: DictConfig, lay: RunLayout) -> str:
    subject = cfg.get("subject") or {}
    if str(subject.get("kind", "gpt")) == "gpt":
        base = f"gpt-{lay.run_dir.resolve().name}"
    else:
        base = str(subject.get("embedded") or Path(str(subject.get("model") or "model")).name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.").lower() or "model"


def _notes(run: Run, rec: dict[str, Any]) -> str:
    src = {**run.summary, **rec}
    scores = rec.get("scores") if isinstance(rec.get("scores"), dict) else {}
    shown = ", ".join(f"{k} {scores[k]:.3f}" for k in SCORES
                      if isinstance(scores.get(k), (int, float)) and not isinstance(scores.get(k), bool))
    return (f"monosemantic describe run {run.folder}: explainer {src.get('explainer')}, "
            f"simulator {src.get('simulator')}" + (f"; {shown}" if shown else ""))


class _Side:
    """The batches of one side being written: SAEDashboard files and the bulk-import source."""

    def __init__(self, tmp: Path, side: str, src: bulk.Source, runs: list[Run], batch_size: int):
        self.side, self.src, self.runs, self.batch_size = side, src, runs, batch_size
        self.dash = tmp if side == "pos" else tmp / "neg"
        self.bulk = tmp / "import" / src.model_id / src.source_id
        self.pending: list[dict[str, Any]] = []
        self.batches = self.features = self.explanations = 0
        self.skipped: list[int] = []
        self.models: set[str] = set()
        self.dash.mkdir(parents=True, exist_ok=True)
        for name, rows in bulk.header_rows(src).items():
            bulk.write_jsonl(self.bulk / f"{name}.jsonl", rows)

    def add(self, feat: dict[str, Any]) -> None:
        self.pending.append(feat)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        n, feats, self.pending = self.batches, self.pending, []
        batch = {"model_id": self.src.model_id, "layer": self.src.layer, "sae_set": self.src.source_set,
                 "sae_id_suffix": None if self.side == "pos" else "neg", "features": feats}
        (self.dash / f"batch-{n}.json").write_text(bulk.dumps(batch), encoding="utf-8")
        neurons, acts, expl = [], [], []
        for feat in feats:
            neuron, rows = bulk.feature_rows(self.src, feat)
            neurons.append(neuron)
            acts += rows
            u = int(feat["feature_index"])
            for run in self.runs:
                rec = run.records.get(u)
                if not rec or rec.get("status") != "ok" or not isinstance(rec.get("description"), str):
                    continue
                model = clean(rec.get("model") or run.summary.get("model") or rec.get("explainer")
                              or "unknown")
                self.models.add(model)
                expl.append(bulk.explanation_row(self.src, u, clean(rec["description"]), model,
                                                 clean(_notes(run, rec)), run.folder))
        bulk.write_jsonl(self.bulk / "features" / f"batch-{n}.jsonl.gz", neurons, gz=True)
        bulk.write_jsonl(self.bulk / "activations" / f"batch-{n}.jsonl.gz", acts, gz=True)
        if expl:
            bulk.write_jsonl(self.bulk / "explanations" / f"batch-{n}.jsonl.gz", expl, gz=True)
        self.batches += 1
        self.features += len(feats)
        self.explanations += len(expl)

    def finish(self) -> None:
        self.flush()
        skipped = {"model_id": self.src.model_id, "layer": str(self.src.layer),
                   "sae_set": self.src.source_set, "skipped_indexes": self.skipped}
        (self.dash / "skipped_indexes.json").write_text(bulk.dumps(skipped), encoding="utf-8")


def _export(tmp: Path, path: Path, meta: dict[str, Any], sources: dict[str, bulk.Source],
            runs: list[Run], nc: NeuronpediaConfig) -> dict[str, _Side]:
    sides: dict[str, _Side] = {}
    for rec in iter_records(path):
        for side in SIDES:
            if side == "neg" and "neg" not in rec:
                continue
            if side not in sides:
                sides[side] = _Side(tmp, side, sources[side], [r for r in runs if r.polarity == side],
                                    nc.batch_size)
            s = sides[side]
            if not active(rec, side):
                s.skipped.append(int(rec["index"]))
                continue
            try:
                s.add(feature(rec, side, n_prompts=int(meta.get("contexts") or 0),
                              n_tokens=int(meta.get("context_len") or 0),
                              dataset=nc.dataset))
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path} (unit {rec['index']}): {e}; rerun tools.top_activations") from None
    for s in sides.values():
        s.finish()
    return sides


def run(cfg: DictConfig) -> dict[str, Any]:
    """Write `run_dir/neuronpedia/<name>/`; returns its path and counts."""
    lay = RunLayout.of(cfg)
    name = unit_name(cfg)
    nc = section(cfg, "neuronpedia", NeuronpediaConfig)
    feats = lay.features(name)
    path = features_path(feats)
    meta = read_json(feats / "meta.json", "features meta")
    guard.verify_sealed(feats, [path.name], "features", "rerun tools.top_activations with overwrite=true")
    runs = find_runs(lay.run_dir, name)
    model_id = nc.model_id or _default_model_id(cfg, lay)
    source_set = nc.source_set or re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    layer = int(meta.get("layer") if meta.get("layer") is not None else 0)
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).isoformat()
    desc = nc.description or f"{meta.get('unit', 'sae')} units {name} of {model_id} (monosemantic export)"
    sources = {side: bulk.Source(model_id, source_set, bulk.source_id(layer, source_set, suffix), layer,
                                 nc.creator_id, nc.creator_name, desc, nc.dataset,
                                 int(meta.get("contexts") or 0), int(meta.get("context_len") or 0), stamp)
               for side, suffix in (("pos", None), ("neg", "neg"))}
    out = lay.run_dir / "neuronpedia" / name
    with guard.output_lock(out, "tools.export_neuronpedia"):
        guard.remove_stale_temps(out.parent, f".{name}.*tmp-*")
        tmp = out.parent / f".{name}.tmp-{os.getpid()}"
        old = out.parent / f".{name}.old.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            sides = _export(tmp, path, meta, sources, runs, nc)
            models = sorted(set().union(*(s.models for s in sides.values())))
            bulk.write_jsonl(tmp / "import" / "explanation_model_types.jsonl",
                             [bulk.model_type_row(m, nc.creator_name) for m in models])
            settings = {"format": FORMAT, "name": name, "unit": meta.get("unit"), "layer": layer,
                        "hook_name": meta.get("hook_name"), "model_id": model_id, "source_set": source_set,
                        "features": str(path), "descriptions": [r.folder for r in runs],
                        "sides": {k: {"source_id": s.src.source_id, "features": s.features,
                                      "skipped": len(s.skipped), "batches": s.batches,
                                      "explanations": s.explanations} for k, s in sides.items()},
                        "explanation_models": models, "config": asdict(nc)}
            (tmp / "run_settings.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    n_feat = sum(s.features for s in sides.values())
    n_expl = sum(s.explanations for s in sides.values())
    skipped = sum(len(s.skipped) for s in sides.values())
    print(f"neuronpedia: {name} -> {out}: {n_feat} features ({', '.join(sides)}), {n_expl} explanations "
          f"from {len(runs)} description runs, {skipped} without examples skipped", flush=True)
    return {"name": name, "folder": str(out), "features": n_feat, "explanations": n_expl, "skipped": skipped}


main = stage_main(run)

if __name__ == "__main__":
    main()
