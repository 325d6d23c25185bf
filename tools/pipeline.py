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

from tools.core.config import stage_main, typed
from tools.core.files import atomic_path, read_json, write_json
from tools.core.layout import RunLayout, neurons_name
from tools.html.sweep import render_sweep_index


@dataclass
class PipelineConfig:
    # Extra L1 coefficients to train (each gets its own SAE, features and site); empty = one SAE.
    sweep_l1_coeffs: list[float] = field(default_factory=list)
    describe: bool = True  # run the describe-and-score stage
    neurons: bool = True  # also analyse and describe the MLP's own neurons, for comparison
    # layers whose neurons are analysed and described (each its own site); null = [features.layer]
    neuron_layers: list[int] | None = None
    # Describe a random sample of this many alive units per side (SAE features, neurons) with an
    # in-process LLM explainer + all-at-once simulator, beside the baseline on the same units; 0 = off.
    llm_sample: int = 0
    llm_embedded: str | None = "smollm2-135m-instruct"  # the LLM: an embedded model ...
    llm_model: str | None = None  # ... or a hub name / folder (set llm_embedded to null)
    llm_threads: int | None = None  # torch CPU threads while the LLM describes (null = default)
    # describe.* settings for both sample runs (LLM and baseline, so both score the same windows),
    # e.g. {explain_top: 6, explain_max_tokens: 48}; the baseline ignores the LLM-only ones
    llm_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    key: str  # unique name in pipeline.json
    module: str
    overrides: dict[str, Any]
    sae_slot: str | None = None  # which SAE this stage trains (autoencoder.train) or reads


def plan(cfg: DictConfig, pcfg: PipelineConfig) -> list[Stage]:
    gpt = str(OmegaConf.select(cfg, "subject.kind", default="gpt")) == "gpt"
    stages = [Stage("prepare", "transformer.prepare", {})]
    if gpt:  # a Hugging Face subject comes trained
        stages.append(Stage("transformer", "transformer.train", {}))
    stages += [
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
            stages += _llm_stages(pcfg, slot, unit, slot)
    if pcfg.neurons:
        layers = pcfg.neuron_layers or [int(OmegaConf.select(cfg, "features.layer", default=0))]
        for layer in layers:
            side = neurons_name(layer, gpt)  # the features stage's name
            unit = {"features.unit": "neuron", "features.layer": layer}
            stages.append(Stage(f"features/{side}", "tools.top_activations", unit))
            if pcfg.describe:
                stages.append(Stage(f"describe/{side}", "tools.describe.stage", unit))
                # signed units: the negative side described and scored separately, from its bottom-k
                stages.append(Stage(f"describe/{side}-neg", "tools.describe.stage",
                                    {**unit, "describe.polarity": "neg"}))
                stages += _llm_stages(pcfg, side, unit, None)
    return stages


def _llm_stages(pcfg: PipelineConfig, side: str, unit: dict[str, Any], slot: str | None) -> list[Stage]:
    """The LLM on a sample of one side's units, and the baseline on the same units and windows."""
    if pcfg.llm_sample <= 0:
        return []
    sample = {**unit, **{f"describe.{k}": v for k, v in pcfg.llm_overrides.items()},
              "describe.sample": pcfg.llm_sample}
    llm = {**sample, "describe.tag": "llm", "describe.explainer": "llm", "describe.simulator": "llm",
           "describe.backend": "local", "describe.embedded": pcfg.llm_embedded,
           "describe.model": pcfg.llm_model, "describe.threads": pcfg.llm_threads}
    baseline = {**sample, "describe.tag": "sample"}
    return [Stage(f"describe-sample/{side}", "tools.describe.stage", baseline, slot),
            Stage(f"describe-llm/{side}", "tools.describe.stage", llm, slot)]


def _with(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    out = cfg.copy()
    for key, value in overrides.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    pcfg = typed(cfg.get("pipeline", {}), PipelineConfig, "pipeline")
    run_dir = Path(cfg.run_dir)
    state_path = RunLayout(run_dir).pipeline_state
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
    with atomic_path(RunLayout(run_dir).summary) as tmp:
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
    if "transformer" in results:  # our GPT (a Hugging Face subject is not trained here)
        lm = results["transformer"]
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
    compare = describer_table(results)
    return "\n".join(lines) + (f"\n\n{compare}" if compare else "")


def _with_ci(d: dict[str, Any], key: str) -> str:
    mean, ci = d.get(f"{key}_mean"), d.get(f"{key}_ci95")
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def describer_table(results: dict[str, Any]) -> str:
    """LLM vs baseline vs controls, per side, on like-for-like windows: means with bootstrap 95%
    intervals over units, n units, failed contexts. Empty when no LLM sample was described."""
    sides = sorted(k.split("/", 1)[1] for k in results if k.startswith("describe-llm/"))
    if not sides:
        return ""
    head = ("| units | describer | n | simulation_all [95% CI] | simulation_top | detection AUC | "
            "random description | shuffled tokens | failed contexts |")
    lines = [head, "|" + "---|" * 9]
    for side in sides:
        for key, who in ((f"describe-llm/{side}", None),
                         (f"describe-sample/{side}", "baseline, same units"),
                         (f"describe/{side}", "baseline, all units")):
            d = results.get(key)
            if not d:
                continue
            name = who or f"LLM {d.get('model')} (explainer + all-at-once simulator)"
            lines.append(f"| {side} | {name} | {_fmt(d.get('simulation_all_n'))} | "
                         f"{_with_ci(d, 'simulation_all')} | {_with_ci(d, 'simulation_top')} | "
                         f"{_with_ci(d, 'detection_auc')} | "
                         f"{_with_ci(d, 'simulation_all_random_description')} | "
                         f"{_with_ci(d, 'simulation_all_shuffled_tokens')} | "
                         f"{_fmt(d.get('failed_contexts'))} |")
    return "\n".join(lines)


main = stage_main(run)

if __name__ == "__main__":
    main()
