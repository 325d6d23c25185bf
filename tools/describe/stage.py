"""The describe-and-score stage: features.jsonl -> descriptions.jsonl + summary.json.

    python -m tools.describe run_dir=runs/demo                                  # offline baseline
    python -m tools.describe run_dir=runs/demo describe=openai \\
        describe.base_url=http://localhost:8000/v1 describe.model=<name>        # any OpenAI-compatible LLM
    python -m tools.describe run_dir=runs/demo features.unit=neuron             # the MLP's neurons

Per unit: split exemplars (explainer and scorer never share a context), explain, simulate the
held-out contexts, score, and score two controls beside it (another unit's description; the
contexts' tokens shuffled). One JSON line is appended per finished unit (write + flush + fsync),
so a killed run loses at most the unit in flight and a rerun skips every unit already written.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from tools.describe.client import ChatClient, ServerUnreachable, Usage
from tools.describe.exemplars import Split, split_exemplars
from tools.describe.explainers import Explanation, explain_baseline, explain_llm
from tools.describe.records import (
    RecordWriter,
    features_path,
    iter_units,
    load_records,
    rewrite_records,
    scan_indices,
)
from tools.describe.scorers import SCORES, active_labels, score
from tools.describe.simulators import LLMSimulator, Simulation, simulate_baseline
from transformer import guard
from transformer.config import UserError, stage_main, typed
from transformer.files import config_hash, read_json, sha256_file, write_json

FORMAT = "monosemantic.descriptions/1"
CONTROLS = ("random_description", "shuffled_tokens")
DEFAULT_NEGATIVE_FRAC = 0.1  # features meta.json without `negative_frac` (older scans)


@dataclass
class DescribeConfig:
    explainer: str = "baseline"  # baseline | llm
    simulator: str = "baseline"  # baseline | llm
    max_units: int | None = None  # describe only the first N units of features.jsonl (None = all)
    # exemplar split (see tools/describe/exemplars.py)
    explain_top: int = 10
    score_top: int = 5
    explain_per_bin: int = 1
    score_per_bin: int = 1
    explain_random: int = 2  # non-firing contexts the explainer may use as background
    score_random: int = 10
    min_explain: int = 3  # fewer explanation exemplars than this -> unit skipped
    min_score_firing: int = 2
    # fewer held-out negatives -> unit skipped; 0 keeps units without negatives (no detection score):
    # GELU neurons rarely stay below negative_frac x max over a whole context
    min_score_random: int = 0
    # baseline explainer
    fire_frac: float = 0.3  # a position is "active" at >= this fraction of the unit's max activation
    min_count: int = 2
    max_items: int = 6
    # scoring
    detection_threshold: float = 1.0  # a context is predicted active if a simulated value (0-10) >= this
    controls: bool = True
    seed: int | None = None  # None = the top-level seed
    overwrite: bool = False  # discard existing descriptions for this unit set
    retry_failed: bool = False  # redo units recorded as failed
    site: bool = True  # re-render the feature browser (tools.html.site) with the descriptions
    chunk_units: int = 256  # units read from features.jsonl and described at a time (bounds memory)
    # LLM (explainer=llm or simulator=llm)
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable only
    timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 1.0  # seconds; doubled each retry (with jitter), Retry-After wins when larger
    concurrency: int = 4
    temperature: float = 0.0
    explain_max_tokens: int = 120
    candidates: int = 1  # llm explainer: sample this many and keep the best on the explanation exemplars
    candidate_temperature: float = 0.7  # sampling temperature when candidates > 1
    top_logprobs: int = 5  # 0 = never ask for logprobs
    cache: bool = True


# Keys that change what is computed (the rest only change how it is fetched).
_RESULT_KEYS = ("explainer", "simulator", "explain_top", "score_top", "explain_per_bin", "score_per_bin",
                "explain_random", "score_random", "min_explain", "min_score_firing", "min_score_random",
                "fire_frac", "min_count", "max_items", "detection_threshold", "controls", "seed", "model",
                "temperature", "explain_max_tokens", "top_logprobs", "candidates", "candidate_temperature",
                "chunk_units")  # chunk_units: the random-description control draws within a chunk


def load_config(cfg: DictConfig) -> DescribeConfig:
    dc = typed(cfg.describe, DescribeConfig, "describe")
    for key in ("explainer", "simulator"):
        if getattr(dc, key) not in ("baseline", "llm"):
            raise UserError(f"config `describe.{key}`: expected baseline or llm, got {getattr(dc, key)!r}")
    for key in ("explain_top", "score_top", "explain_per_bin", "score_per_bin", "explain_random",
                "score_random", "min_explain", "min_score_firing", "min_score_random", "min_count",
                "max_retries", "top_logprobs"):
        if getattr(dc, key) < 0:
            raise UserError(f"config `describe.{key}`: must be >= 0, got {getattr(dc, key)}")
    for key in ("max_items", "concurrency", "explain_max_tokens", "chunk_units", "candidates"):
        if getattr(dc, key) < 1:
            raise UserError(f"config `describe.{key}`: must be >= 1, got {getattr(dc, key)}")
    if dc.max_units is not None and dc.max_units < 1:
        raise UserError(f"config `describe.max_units`: must be >= 1 or null, got {dc.max_units}")
    if not 0 < dc.fire_frac <= 1:
        raise UserError(f"config `describe.fire_frac`: must be in (0, 1], got {dc.fire_frac}")
    if dc.timeout <= 0 or dc.backoff < 0:
        raise UserError("config `describe.timeout` must be > 0 and `describe.backoff` >= 0")
    if dc.top_logprobs > 20:
        raise UserError(f"config `describe.top_logprobs`: at most 20 (OpenAI's limit), got {dc.top_logprobs}")
    if uses_llm(dc):
        if not dc.model:
            raise UserError("config `describe.model`: required when describe.explainer or describe.simulator "
                            "is llm (e.g. describe.model=Qwen/Qwen2.5-7B-Instruct)")
        if dc.base_url is not None and not dc.base_url.startswith(("http://", "https://")):
            raise UserError(f"config `describe.base_url`: expected an http(s) URL, got {dc.base_url!r}")
    if dc.seed is None:
        dc.seed = int(cfg.seed)
    return dc


def uses_llm(dc: DescribeConfig) -> bool:
    return "llm" in (dc.explainer, dc.simulator)


def unit_name(cfg: DictConfig) -> str:
    """The features folder to describe, by the features stage's own rule ("neurons" or the SAE's name)."""
    from tools.top_activations import unit_name as features_unit_name  # imports torch: only when needed

    return features_unit_name(cfg)


# ---------------------------------------------------------------------------------------------
# one unit


class Describer:
    def __init__(self, dc: DescribeConfig, client: ChatClient | None, config_hash_: str,
                 negative_frac: float = DEFAULT_NEGATIVE_FRAC):
        self.dc, self.client, self.config_hash = dc, client, config_hash_
        self.negative_frac = negative_frac
        self.llm_sim = LLMSimulator(client, top_logprobs=dc.top_logprobs) if dc.simulator == "llm" else None

    def split(self, unit: dict[str, Any]) -> Split:
        d = self.dc
        return split_exemplars(unit, explain_top=d.explain_top, score_top=d.score_top,
                               explain_per_bin=d.explain_per_bin, score_per_bin=d.score_per_bin,
                               explain_random=d.explain_random, score_random=d.score_random)

    def skip_reason(self, unit: dict[str, Any], split: Split) -> str | None:
        d = self.dc
        if not unit.get("top"):
            return "the unit never fired in the scan (no top exemplars)"
        if len(split.explain) < d.min_explain:
            return f"only {len(split.explain)} explanation exemplars (describe.min_explain={d.min_explain})"
        if len(split.score_firing) < d.min_score_firing:
            return (f"only {len(split.score_firing)} held-out firing contexts "
                    f"(describe.min_score_firing={d.min_score_firing})")
        if len(split.score_random) < d.min_score_random:
            return (f"only {len(split.score_random)} held-out non-firing contexts "
                    f"(describe.min_score_random={d.min_score_random})")
        return None

    def explain(self, split: Split, usage: Usage) -> Explanation:
        d = self.dc
        if d.explainer == "baseline":
            return explain_baseline(split.explain, split.background, fire_frac=d.fire_frac,
                                    min_count=d.min_count, max_items=d.max_items)
        assert self.client is not None
        if d.candidates == 1:
            return explain_llm(self.client, split.explain, max_tokens=d.explain_max_tokens,
                               temperature=d.temperature, usage=usage)
        cands = [explain_llm(self.client, split.explain, max_tokens=d.explain_max_tokens,
                             temperature=d.candidate_temperature, usage=usage, seed=d.seed + i)
                 for i in range(d.candidates)]
        ok = [c for c in cands if c.ok]
        if not ok:
            return cands[0]
        # Choose on the explanation exemplars, never on the held-out scoring contexts.
        kinds = ["top"] * len(split.explain)
        acts = [ex["acts"] for ex in split.explain]
        rated = []
        for c in ok:
            assert c.description is not None
            sim = self.simulate(c.description, [list(ex["strs"]) for ex in split.explain], usage)
            s = None if sim.not_applicable else score(kinds, acts, sim.preds, threshold=d.detection_threshold)
            rated.append((c, None if s is None else s["simulation_top"]))
        best = max(rated, key=lambda cr: -math.inf if cr[1] is None else cr[1])[0]
        best.candidates = [{"description": c.description, "selection_score": v} for c, v in rated]
        return best

    def simulate(self, description: str, contexts: list[list[str]], usage: Usage) -> Simulation:
        if self.llm_sim is None:
            return simulate_baseline(description, contexts)
        return self.llm_sim(description, contexts, usage)

    def base_record(self, index: int) -> dict[str, Any]:
        d = self.dc
        return {"index": index, "status": "ok", "description": None, "explainer": d.explainer,
                "simulator": d.simulator, "simulator_mode": None, "scores": None, "controls": None,
                "reason": None, "raw": None, "prompt_hash": None,
                "model": d.model if uses_llm(d) else "baseline", "seed": d.seed,
                "config_hash": self.config_hash}

    def run_simulation(self, description: str, split: Split, usage: Usage, shuffle_seed: list[int] | None
                       ) -> tuple[dict[str, Any] | None, Simulation]:
        """Scores of one description on the scoring contexts (tokens permuted when shuffle_seed)."""
        scoring = split.scoring()
        kinds = [k for k, _ in scoring]
        acts = [ex["acts"] for _, ex in scoring]
        contexts = [list(ex["strs"]) for _, ex in scoring]
        if shuffle_seed is not None:
            rng = np.random.default_rng(shuffle_seed)
            contexts = [[strs[j] for j in rng.permutation(len(strs))] for strs in contexts]
        sim = self.simulate(description, contexts, usage)
        failed = sum(p is None for p in sim.preds)
        if sim.not_applicable or failed * 2 > len(contexts):
            return None, sim
        # "activates the unit": the features stage's negative rule, relative to the unit's max
        max_act = split.max_act if split.max_act is not None else max(max(a) for a in acts)
        active = active_labels(acts, max_act, self.negative_frac)
        return score(kinds, acts, sim.preds, threshold=self.dc.detection_threshold, active=active), sim

    def score_unit(self, index: int, split: Split, expl: Explanation, other: tuple[int, str] | None,
                   usage: Usage) -> dict[str, Any]:
        rec = self.base_record(index)
        rec.update(description=expl.description, prompt_hash=expl.prompt_hash, tokens=expl.tokens or None,
                   exemplars=_exemplar_counts(split))
        if expl.candidates:
            rec["candidates"] = expl.candidates
        assert expl.description is not None
        scores, sim = self.run_simulation(expl.description, split, usage, None)
        rec["simulator_mode"] = sim.mode
        rec["failed_contexts"] = sum(p is None for p in sim.preds)
        if scores is None:
            first = sim.failures[0] if sim.failures else {}
            rec.update(status="failed", raw=first.get("raw"),
                       reason=sim.not_applicable or f"simulator failed on {rec['failed_contexts']} of "
                       f"{len(sim.preds)} contexts (first: {first.get('reason')})")
            return rec
        rec["scores"] = scores
        if self.dc.controls:
            controls: dict[str, Any] = {}
            if other is not None:
                c, _ = self.run_simulation(other[1], split, usage, None)
                controls["random_description"] = {**(c or dict.fromkeys(SCORES)), "from": other[0]}
            else:
                controls["random_description"] = None
            c, _ = self.run_simulation(expl.description, split, usage, [self.dc.seed, index, 1])
            controls["shuffled_tokens"] = c
            rec["controls"] = controls
        return rec


def _exemplar_counts(split: Split) -> dict[str, int]:
    return {"explain": len(split.explain), "background": len(split.background),
            "score_top": len(split.score_top), "score_quantile": len(split.score_quantile),
            "score_random": len(split.score_random), "dropped_overlap": split.dropped}


def pick_other(pool: dict[int, str], index: int, seed: int) -> tuple[int, str] | None:
    others = sorted(k for k in pool if k != index)
    if not others:
        return None
    k = others[int(np.random.default_rng([seed, index]).integers(len(others)))]
    return k, pool[k]


# ---------------------------------------------------------------------------------------------
# summary


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "n": len(values)}


def summarize(records: list[dict[str, Any]], n_units: int) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]
    scores = {k: _stats([r["scores"][k] for r in ok if r["scores"].get(k) is not None]) for k in SCORES}
    controls = {c: {k: _stats([r["controls"][c][k] for r in ok if (r.get("controls") or {}).get(c)
                               and r["controls"][c].get(k) is not None]) for k in SCORES} for c in CONTROLS}
    usage: Counter[str] = Counter()
    for r in records:
        usage.update(r.get("usage") or {})
    reasons = Counter((r.get("reason") or "")[:80] for r in records if r["status"] != "ok")
    return {
        "units": n_units, "described": len(ok),
        "failed": sum(r["status"] == "failed" for r in records),
        "skipped": sum(r["status"] == "skipped" for r in records),
        "pending": n_units - len(records), "complete": len(records) == n_units,
        "scores": scores, "controls": controls,
        "simulator_modes": dict(Counter(r.get("simulator_mode") for r in ok if r.get("simulator_mode"))),
        "usage": dict(usage), "reasons": dict(reasons.most_common(10)),
    }


def print_table(summary: dict[str, Any]) -> None:
    print(f"\ndescriptions of {summary['name']}: {summary['described']} described, {summary['failed']} "
          f"failed, {summary['skipped']} skipped of {summary['units']} units "
          f"({summary['explainer']} explainer, {summary['simulator']} simulator)")
    print(f"{'score':<16} {'mean':>7} {'median':>7} {'n':>5} | {'random desc':>11} {'shuffled':>9}")

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    for k in SCORES:
        s = summary["scores"][k]
        c = summary["controls"]
        print(f"{k:<16} {f(s['mean']):>7} {f(s['median']):>7} {s['n']:>5} | "
              f"{f(c['random_description'][k]['mean']):>11} {f(c['shuffled_tokens'][k]['mean']):>9}")
    u = summary["usage"]
    if u.get("calls") or u.get("cached"):
        print(f"LLM: {u.get('calls', 0)} calls ({u.get('cached', 0)} cached, {u.get('retries', 0)} retries), "
              f"{u.get('prompt_tokens', 0)} prompt + {u.get('completion_tokens', 0)} completion tokens")


def flat_figures(summary: dict[str, Any]) -> dict[str, Any]:
    out = {k: summary[k] for k in ("units", "described", "failed", "skipped")}
    for k in SCORES:
        out[f"{k}_mean"] = summary["scores"][k]["mean"]
        out[f"{k}_median"] = summary["scores"][k]["median"]
        out[f"{k}_n"] = summary["scores"][k]["n"]
        for c in CONTROLS:
            out[f"{k}_{c}_mean"] = summary["controls"][c][k]["mean"]
    u = summary["usage"]
    out["tokens"] = int(u.get("prompt_tokens", 0)) + int(u.get("completion_tokens", 0))
    out["llm_calls"] = int(u.get("calls", 0))
    return out


# ---------------------------------------------------------------------------------------------
# stage


def _paths(cfg: DictConfig) -> tuple[str, Path, Path]:
    name = unit_name(cfg)
    run_dir = Path(cfg.run_dir)
    return name, run_dir / "features" / name, run_dir / "descriptions" / name


def negative_frac(meta: dict[str, Any]) -> float:
    """The features stage's negative threshold (relative to each unit's max), from its meta.json."""
    v = meta.get("negative_frac", DEFAULT_NEGATIVE_FRAC)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
        raise UserError(f"features meta.json: `negative_frac` must be a number in [0, 1), got {v!r}")
    return float(v)


def _features_meta(feats_dir: Path) -> dict[str, Any]:
    return read_json(feats_dir / "meta.json", "features meta") if (feats_dir / "meta.json").is_file() else {}


def _config_hash(dc: DescribeConfig, features: Path, neg_frac: float = DEFAULT_NEGATIVE_FRAC) -> str:
    fields = asdict(dc)
    return config_hash({"describe": {k: fields[k] for k in _RESULT_KEYS}, "negative_frac": neg_frac,
                        "features": sha256_file(features) if features.is_file() else None})


def done(cfg: DictConfig) -> bool:
    dc = load_config(cfg)
    name, feats, out = _paths(cfg)
    summary_path = out / "summary.json"
    if not summary_path.is_file() or not (out / "descriptions.jsonl").is_file():
        return False
    try:
        summary = read_json(summary_path, "descriptions summary")
    except UserError:
        return False
    try:
        neg_frac = negative_frac(_features_meta(feats))
    except UserError:
        return False
    return (summary.get("complete") is True and summary.get("config_hash") == _config_hash(
        dc, feats / "features.jsonl", neg_frac) and summary.get("max_units") == dc.max_units)


def run(cfg: DictConfig) -> dict[str, Any]:
    load_config(cfg)
    _, feats_dir, out = _paths(cfg)
    fix = "rebuild the features: python -m tools.top_activations overwrite=true"
    with guard.output_lock(out, "tools.describe"):  # issue 13: one writer, intact and current features
        guard.verify_sealed(feats_dir, ["features.jsonl"], "features", fix)
        guard.check_sealed_inputs(feats_dir, fix)
        return _run(cfg)


def _run(cfg: DictConfig) -> dict[str, Any]:
    dc = load_config(cfg)
    name, feats_dir, out = _paths(cfg)
    feats = features_path(feats_dir)
    indices = scan_indices(feats, dc.max_units)
    meta = _features_meta(feats_dir)
    neg_frac = negative_frac(meta)
    chash = _config_hash(dc, feats, neg_frac)
    path = out / "descriptions.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    if dc.overwrite and path.exists():
        path.unlink()
    records = load_records(path)
    stale = {r.get("config_hash") for r in records.values()} - {chash}
    if stale:
        old = path.with_name(f"descriptions.{sorted(map(str, stale))[0]}.jsonl")
        os.replace(path, old)
        print(f"describe: the config or features changed since {path} was written; kept it as {old.name} "
              "and starting over", flush=True)
        records = {}
    if dc.retry_failed and any(r["status"] == "failed" for r in records.values()):
        records = {i: r for i, r in records.items() if r["status"] != "failed"}
        rewrite_records(path, list(records.values()))

    pending = [i for i in indices if i not in records]
    client = None
    aborted: ServerUnreachable | None = None
    if pending:
        if uses_llm(dc):
            client = ChatClient(base_url=dc.base_url, model=str(dc.model), api_key_env=dc.api_key_env,
                                timeout=dc.timeout, max_retries=dc.max_retries, backoff=dc.backoff,
                                concurrency=dc.concurrency, cache_dir=out / "cache" if dc.cache else None)
        describer = Describer(dc, client, chash, neg_frac)
        writer = RecordWriter(path)
        workers = dc.concurrency if client is not None else 1
        chunk: list[dict[str, Any]] = []
        # chunks are fixed slices of the whole unit list, so a resumed run draws the same controls
        block = {u: i // dc.chunk_units for i, u in enumerate(indices)}

        def flush() -> ServerUnreachable | None:
            k = block[chunk[0]["index"]]
            members = set(indices[k * dc.chunk_units:(k + 1) * dc.chunk_units])
            return _describe_pending(describer, chunk, records, writer, workers, bar, members)

        try:
            with tqdm(total=len(pending), desc=f"describe {name}", unit="unit") as bar:
                for unit in iter_units(feats, set(pending), dc.max_units):
                    if chunk and block[unit["index"]] != block[chunk[0]["index"]]:
                        aborted, chunk = flush(), []
                        if aborted:
                            break
                    chunk.append(unit)
                if chunk and not aborted:
                    aborted = flush()
        finally:
            writer.close()

    final = [records[i] for i in indices if i in records]
    summary = {"format": "monosemantic.descriptions_summary/1", "name": name,
               "unit": meta.get("unit") or OmegaConf.select(cfg, "features.unit", default="sae"),
               "explainer": dc.explainer, "simulator": dc.simulator,
               "model": dc.model if uses_llm(dc) else "baseline", "seed": dc.seed, "max_units": dc.max_units,
               "negative_frac": neg_frac,
               "config_hash": chash, **summarize(final, len(indices))}
    summary["usage_this_run"] = client.usage.as_dict() if client else {}
    write_json(out / "summary.json", summary)
    if aborted is not None:
        raise ServerUnreachable(f"{aborted} -- {len(final)} finished units are kept in {path}; rerun to "
                                "continue") from None
    print_table(summary)
    figures = flat_figures(summary)
    figures["site"] = _render_site(Path(cfg.run_dir), name) if dc.site else None
    print(f"describe: {summary['described']} described, {summary['failed']} failed, {summary['skipped']} "
          f"skipped of {summary['units']} units -> {path} (+ summary.json)"
          + (f"; site {figures['site']}" if figures["site"] else ""), flush=True)
    return figures


def _describe_pending(describer: Describer, units: list[dict[str, Any]], records: dict[int, dict[str, Any]],
                      writer: RecordWriter, workers: int, bar: tqdm,
                      members: set[int]) -> ServerUnreachable | None:
    """Explain the pending units of one chunk, then score each: the random-description control draws
    from the chunk's described units (`members`: the whole fixed chunk, finished earlier or now), so
    it is a function of (seed, unit) whatever was done before a restart."""
    dc = describer.dc
    splits: dict[int, Split] = {}
    explained: dict[int, tuple[Explanation, Usage]] = {}

    def finish(rec: dict[str, Any], usage: Usage) -> None:
        rec["usage"] = usage.as_dict()
        writer.write(rec)
        records[rec["index"]] = rec
        bar.update()

    def explain_one(unit: dict[str, Any]) -> None:
        index = unit["index"]
        usage = Usage()
        split = describer.split(unit)
        reason = describer.skip_reason(unit, split)
        if reason is not None:
            rec = describer.base_record(index)
            rec.update(status="skipped", reason=reason, exemplars=_exemplar_counts(split))
            finish(rec, usage)
            return
        expl = describer.explain(split, usage)
        if not expl.ok:
            rec = describer.base_record(index)
            rec.update(status="failed", reason=expl.reason, raw=expl.raw, prompt_hash=expl.prompt_hash,
                       exemplars=_exemplar_counts(split))
            finish(rec, usage)
            return
        splits[index] = split
        explained[index] = (expl, usage)

    def score_one(index: int) -> None:
        expl, usage = explained[index]
        rec = describer.score_unit(index, splits[index], expl, pick_other(pool, index, dc.seed), usage)
        finish(rec, usage)

    pool: dict[int, str] = {}
    for phase in ("explain", "score"):
        if phase == "score":
            pool = {i: r["description"] for i, r in records.items() if r["status"] == "ok" and i in members}
            pool.update({i: e.description for i, (e, _) in explained.items() if e.description})
        fn, items = (explain_one, units) if phase == "explain" else (score_one, sorted(explained))
        if workers == 1:
            for item in items:
                try:
                    fn(item)
                except ServerUnreachable as e:
                    return e
            continue
        with ThreadPoolExecutor(workers) as ex:
            futures = [ex.submit(fn, item) for item in items]
            try:
                for fut in as_completed(futures):
                    fut.result()
            except ServerUnreachable as e:
                for f in futures:
                    f.cancel()
                return e
    return None


def _render_site(run_dir: Path, name: str) -> str | None:
    """Re-render the feature browser with descriptions when the HTML tool is there. The descriptions
    are complete either way, so a site problem is reported, not raised."""
    try:
        from tools.html.site import render_site
    except ImportError:
        return None
    try:
        return str(render_site(run_dir, name))
    except (UserError, OSError) as e:
        print(f"describe: warning: the site was not re-rendered ({e}); run tools.top_activations or "
              "tools.html to rebuild it", flush=True)
        return None


main = stage_main(run)

if __name__ == "__main__":
    main()
