"""Every stage in order: prepare -> transformer -> activations -> SAE -> features -> descriptions -> site.

`python -m tools.pipeline preset=demo` runs the whole demo. The plan is a list of steps, each a
stage class (`tools.core.stage.Stage`) with the overrides it runs under; a step whose output is
complete and matches the config (its stage's `done()`) is skipped, so a rerun after a kill continues
where it stopped. Each unit set ends with the site stage (`site/<unit set>`), after its features and
describe runs. Each step's summary is kept in `run_dir/pipeline.json`; the final table is printed and
written to `run_dir/summary.md`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from autoencoder.generate import ActivationsStage
from autoencoder.train import SAETrainStage
from tools.core.config import resolve_device, section, stage_main
from tools.core.distributed import Dist
from tools.core.files import atomic_path, read_json, write_json
from tools.core.layout import RunLayout, neurons_name
from tools.core.stage import Stage
from tools.describe.stage import DescribeStage
from tools.html.sweep import render_sweep_index
from tools.pipeline_config import PipelineConfig
from tools.site import SiteStage
from tools.top_activations import FeaturesStage
from transformer.prepare import TokensStage
from transformer.train import TrainStage


@dataclass
class Step:
    """One stage of the plan: its class, run over the config with `overrides`."""

    key: str  # unique name in pipeline.json
    stage: type[Stage]
    overrides: dict[str, Any]
    sae_slot: str | None = None  # which SAE this step trains (SAETrainStage) or reads


def plan(cfg: DictConfig, pcfg: PipelineConfig) -> list[Step]:
    """The steps in order; each unit set's site after its features and describe runs."""
    gpt = str(OmegaConf.select(cfg, "subject.kind", default="gpt")) == "gpt"
    steps = [Step("prepare", TokensStage, {})]
    if gpt:  # a Hugging Face subject comes trained
        steps.append(Step("transformer", TrainStage, {}))
    steps += [
        Step("activations/train", ActivationsStage, {"activations.split": "train"}),
        Step("activations/val", ActivationsStage, {"activations.split": "val"}),
    ]
    coeffs = pcfg.sweep_l1_coeffs or [None]
    for i, coeff in enumerate(coeffs):
        slot = "sae" if coeff is None else f"sae/{i}"
        sae = {} if coeff is None else {"sae.l1_coeff": coeff, "sae.name": None}
        unit = {**sae, "features.unit": "sae"}
        steps.append(Step(slot, SAETrainStage, sae, slot))
        steps.append(Step(f"features/{slot}", FeaturesStage, unit, slot))
        if pcfg.describe:
            steps.append(Step(f"describe/{slot}", DescribeStage, unit, slot))
            steps += _llm_steps(pcfg, slot, unit, slot)
        steps.append(Step(f"site/{slot}", SiteStage, unit, slot))
    if pcfg.neurons:
        layers = pcfg.neuron_layers or [int(OmegaConf.select(cfg, "features.layer", default=0))]
        if len(layers) > 1:  # every layer's neurons from one pass over the text
            steps.append(Step("features/neuron-layers", FeaturesStage,
                              {"features.unit": "neuron", "features.layers": list(layers)}))
        for layer in layers:
            side = neurons_name(layer, gpt)  # the features stage's name
            unit = {"features.unit": "neuron", "features.layer": layer}
            if len(layers) == 1:
                steps.append(Step(f"features/{side}", FeaturesStage, unit))
            if pcfg.describe:
                steps.append(Step(f"describe/{side}", DescribeStage, unit))
                # signed units: the negative side described and scored separately, from its bottom-k
                neg = {**unit, "describe.polarity": "neg"}
                steps.append(Step(f"describe/{side}-neg", DescribeStage, neg))
                steps += _llm_steps(pcfg, side, unit, None)
            steps.append(Step(f"site/{side}", SiteStage, unit))
    return steps


def _llm_steps(pcfg: PipelineConfig, side: str, unit: dict[str, Any], slot: str | None) -> list[Step]:
    """The LLM on a sample of one side's units, and the baseline on the same units and windows."""
    if pcfg.llm_sample <= 0:
        return []
    sample = {**unit, **{f"describe.{k}": v for k, v in pcfg.llm_overrides.items()},
              "describe.sample": pcfg.llm_sample}
    llm = {**sample, "describe.tag": "llm", "describe.explainer": "llm", "describe.simulator": "llm",
           "describe.backend": "local", "describe.embedded": pcfg.llm_embedded,
           "describe.model": pcfg.llm_model, "describe.threads": pcfg.llm_threads}
    baseline = {**sample, "describe.tag": "sample"}
    return [Step(f"describe-sample/{side}", DescribeStage, baseline, slot),
            Step(f"describe-llm/{side}", DescribeStage, llm, slot)]


def _with(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    out = cfg.copy()
    for key, value in overrides.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


# the stages that split their work over torchrun's ranks; the others run on rank 0 while the rest wait
DISTRIBUTED = (TrainStage, ActivationsStage, SAETrainStage, FeaturesStage)
WAIT_S = 7 * 24 * 3600  # how long the other ranks may wait for rank 0's stages (describe can take days)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every step not yet complete; returns (and writes to pipeline.json) each step's figures.
    Under torchrun the training, generation and features steps run on every rank, the others on
    rank 0 (the rest wait at a barrier); rank 0 decides what runs and writes the state."""
    dist = Dist.start(resolve_device(cfg.get("device", "auto")), timeout_s=WAIT_S)
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _run(cfg: DictConfig, dist: Dist) -> dict[str, Any]:
    pcfg = section(cfg, "pipeline", PipelineConfig)
    run_dir = Path(cfg.run_dir)
    state_path = RunLayout(run_dir).pipeline_state
    state = {"format": "monosemantic.pipeline/1"}
    if state_path.is_file():
        state = read_json(state_path, "pipeline state")
    results: dict[str, Any] = state.setdefault("stages", {})
    sae_names: dict[str, str] = {}
    steps = plan(cfg, pcfg)
    say = print if dist.master else (lambda *a, **k: None)
    for n, step in enumerate(steps, 1):
        overrides = dict(step.overrides)
        if step.sae_slot and step.stage is not SAETrainStage:
            overrides["features.sae"] = sae_names[step.sae_slot]
        stage = step.stage(_with(cfg, overrides))
        head = f"[{n}/{len(steps)}] {step.key}"
        # rank 0 decides (done() may hash the stage's files: once, not on every rank)
        todo = not (stage.done() and step.key in results) if dist.master else None
        if not dist.gather(todo)[0]:
            say(f"{head}: complete, skipped", flush=True)
        else:
            say(f"{head}: running {stage.name}", flush=True)
            t0 = time.perf_counter()
            result = (stage.run() or {}) if dist.master or step.stage in DISTRIBUTED else {}
            dist.barrier()
            results[step.key] = {**dist.gather(result)[0], "seconds": round(time.perf_counter() - t0, 1)}
            if dist.master:
                write_json(state_path, state)
        if step.stage is SAETrainStage:
            sae_names[step.key] = results[step.key]["name"]
    if not dist.master:
        return results
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
        if not key.startswith("site/"):  # a site step mostly finds the site its stages rendered current
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
