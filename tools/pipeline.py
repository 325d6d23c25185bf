"""Every stage in order: prepare -> transformer -> activations -> SAE -> features -> descriptions.

`python -m tools.pipeline preset=demo` runs the whole demo. A stage whose outputs are complete and
match the config (its `done(cfg)`) is skipped, so a rerun after a kill continues where it stopped.
Each stage's summary is kept in `run_dir/pipeline.json`; the final table is printed and written to
`run_dir/summary.md`.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tools.html.sweep import render_sweep_index
from transformer.config import stage_main, typed
from transformer.files import atomic_path, read_json, write_json


@dataclass
class PipelineConfig:
    # Extra L1 coefficients to train (each gets its own SAE, features and site); empty = one SAE.
    sweep_l1_coeffs: list[float] = field(default_factory=list)
    describe: bool = True  # run the describe-and-score stage
    neurons: bool = True  # also analyse and describe the MLP's own neurons, for comparison


@dataclass
class Stage:
    key: str  # unique name in pipeline.json
    module: str
    overrides: dict[str, Any]
    sae_slot: str | None = None  # which SAE this stage trains (autoencoder.train) or reads


def plan(cfg: DictConfig, pcfg: PipelineConfig) -> list[Stage]:
    stages = [
        Stage("prepare", "transformer.prepare", {}),
        Stage("transformer", "transformer.train", {}),
        Stage("activations/train", "autoencoder.generate", {"activations.split": "train"}),
        Stage("activations/val", "autoencoder.generate", {"activations.split": "val"}),
    ]
    coeffs = pcfg.sweep_l1_coeffs or [None]
    for i, coeff in enumerate(coeffs):
        slot = "sae" if coeff is None else f"sae/{i}"
        sae = {} if coeff is None else {"sae.l1_coeff": coeff, "sae.name": None}
        unit = {**sae, "features.unit": "sae"}
        stages.append(Stage(slot, "autoencoder.train", sae, slot))
        stages.append(Stage(f"features/{slot}", "tools.top_activations", unit, slot))
        if pcfg.describe:
            stages.append(Stage(f"describe/{slot}", "tools.describe.stage", unit, slot))
    if pcfg.neurons:
        stages.append(Stage("features/neurons", "tools.top_activations", {"features.unit": "neuron"}))
        if pcfg.describe:
            stages.append(Stage("describe/neurons", "tools.describe.stage", {"features.unit": "neuron"}))
    return stages


def _with(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    out = cfg.copy()
    for key, value in overrides.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    pcfg = typed(cfg.get("pipeline", {}), PipelineConfig, "pipeline")
    run_dir = Path(cfg.run_dir)
    state_path = run_dir / "pipeline.json"
    state = {"format": "monosemantic.pipeline/1"}
    if state_path.is_file():
        state = read_json(state_path, "pipeline state")
    results: dict[str, Any] = state.setdefault("stages", {})
    sae_names: dict[str, str] = {}
    stages = plan(cfg, pcfg)
    for n, stage in enumerate(stages, 1):
        overrides = dict(stage.overrides)
        if stage.sae_slot and stage.module != "autoencoder.train":
            overrides["features.sae"] = sae_names[stage.sae_slot]
        stage_cfg = _with(cfg, overrides)
        module = importlib.import_module(stage.module)
        head = f"[{n}/{len(stages)}] {stage.key}"
        if module.done(stage_cfg) and stage.key in results:
            print(f"{head}: complete, skipped", flush=True)
        else:
            print(f"{head}: running {stage.module}", flush=True)
            t0 = time.perf_counter()
            result = module.run(stage_cfg) or {}
            results[stage.key] = {**result, "seconds": round(time.perf_counter() - t0, 1)}
            write_json(state_path, state)
        if stage.module == "autoencoder.train":
            sae_names[stage.key] = results[stage.key]["name"]
    if pcfg.sweep_l1_coeffs:
        saes = []
        for i, coeff in enumerate(pcfg.sweep_l1_coeffs):
            described = results.get(f"describe/sae/{i}", {})
            saes.append({**results[f"sae/{i}"], "l1_coeff": coeff,
                         "simulation_all_mean": described.get("simulation_all_mean")})
        results["sweep"] = {"site": str(render_sweep_index(run_dir, saes))}
    table = summary_table(results)
    with atomic_path(run_dir / "summary.md") as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    print(table)
    return results


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table of the figures that matter, from the stages' summaries."""
    rows: list[tuple[str, str]] = []
    lm = results.get("transformer", {})
    rows.append(("LM val loss (nats/token)", _fmt(lm.get("val_loss"))))
    rows.append(("corpus unigram entropy (nats/token)", _fmt(lm.get("unigram_entropy_nats"))))
    for key in sorted(k for k in results if k == "sae" or k.startswith("sae/")):
        sae = results[key]
        rows.append((f"SAE `{sae.get('name')}` L0", _fmt(sae.get("l0"), 1)))
        rows.append(("  explained variance", _fmt(sae.get("explained_variance"))))
        rows.append(("  dead fraction", _fmt(sae.get("dead_fraction"))))
        rows.append(("  loss recovered", _fmt(sae.get("loss_recovered"))))
    for key in sorted(k for k in results if k.startswith("describe/")):
        d = results[key]
        counts = f"{_fmt(d.get('described'))} / {_fmt(d.get('failed'))} / {_fmt(d.get('skipped'))}"
        rows.append((f"{key}: units described / failed / skipped", counts))
        for score in ("simulation_all", "simulation_top", "detection"):
            if d.get(f"{score}_mean") is not None:
                controls = (f"{_fmt(d.get(f'{score}_random_description_mean'))} / "
                            f"{_fmt(d.get(f'{score}_shuffled_tokens_mean'))}")
                rows.append((f"  mean {score} (controls: random description / shuffled)",
                             f"{_fmt(d[f'{score}_mean'])} ({controls}), n={_fmt(d.get(f'{score}_n'))}"))
        if d.get("tokens"):
            rows.append(("  LLM tokens used", _fmt(d["tokens"])))
    for key, res in results.items():
        rows.append((f"wall time: {key} (s)", _fmt(res.get("seconds"), 1)))
    total = sum(res.get("seconds") or 0.0 for res in results.values())
    rows.append(("wall time: all stages run so far (s)", _fmt(total, 1)))
    sites = dict.fromkeys(res["site"] for res in results.values() if res.get("site"))
    rows += [("feature browser", site) for site in sites]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'figure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)


main = stage_main(run)

if __name__ == "__main__":
    main()
