"""The describe-and-score stage: features.jsonl -> descriptions.jsonl + summary.json.

    python -m tools.describe run_dir=runs/demo                                  # offline baseline
    python -m tools.describe run_dir=runs/demo describe=openai \\
        describe.base_url=http://localhost:8000/v1 describe.model=<name>        # any OpenAI-compatible LLM
    python -m tools.describe run_dir=runs/demo describe=local                   # in-process SmolLM2
    python -m tools.describe run_dir=runs/demo features.unit=neuron             # the MLP's neurons

Per unit: split exemplars (explainer and scorer never share a context), explain, simulate the
held-out contexts, score, and score two controls beside it (another unit's description; the
contexts' tokens shuffled). One JSON line is appended per finished unit (write + flush + fsync),
so a killed run loses at most the unit in flight and a rerun skips every unit already written.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from tools.describe.client import ChatClient, ServerUnreachable, Usage
from tools.describe.describer import (
    DEFAULT_NEGATIVE_FRAC,
    Describer,
    exemplar_counts,
    model_name,
    pick_other,
    uses_llm,
)
from tools.describe.exemplars import Split
from tools.describe.explainers import Explanation
from tools.describe.records import (
    RecordWriter,
    features_path,
    iter_units,
    load_records,
    rewrite_records,
    scan_indices,
)
from tools.describe.summary import flat_figures, print_table, summarize
from tools.describe.units import select_units
from transformer import guard
from transformer.config import UserError, resolve_device, stage_main, typed
from transformer.files import config_hash, read_json, sha256_file, write_json

FORMAT = "monosemantic.descriptions/1"


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
    score_random: int = 0  # 0: uniform windows are the negatives of every unit alike (see baseline.yaml)
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
    # candidates > 1: Transluce-style selection. Each candidate is written from its own random subset of
    # the explanation exemplars, the best by simulation_all on a validation split is kept, and scores are
    # measured on the test split (held-out windows split again by context; see exemplars.split_validation)
    candidates: int = 1
    candidate_exemplars: int | None = None  # exemplars per candidate (None = two thirds of them)
    candidate_temperature: float = 0.7  # llm explainer's sampling temperature for candidates
    # detection truth: a window activates the unit when its max exceeds the first of negative_frac x
    # max_act and the unit's activation quantiles at these probabilities (features `act_quantiles`) under
    # which at least `detection_negatives` of its uniform windows fall (so every unit has negatives)
    detection_quantiles: list[float] = field(default_factory=lambda: [0.99, 0.999])
    detection_negatives: float = 0.2
    top_logprobs: int = 5  # 0 = never ask for logprobs
    # openai simulator: answer budget per token of a line-per-token answer (`index<TAB>value\n` is 3-6
    # tokens); all at once via /v1/completions echo + logprobs: auto = probe the server once, false = never
    simulate_max_tokens_per_token: int = 8
    prompt_logprobs: Any = "auto"  # auto | false
    cache: bool = True
    # LLM backend: openai (any OpenAI-compatible server at base_url) | local (in-process transformers,
    # named like a subject: `embedded` or `model` = hub name or folder; all-at-once simulator)
    backend: str = "openai"
    embedded: str | None = None  # local: an embedded model (smollm2-135m-instruct)
    dtype: str = "auto"  # local: auto = bfloat16 on CUDA, float32 on CPU
    device: str | None = None  # local: null = the top-level device
    # simulator labels; null = local: 0-10, or 0-9 if "10" is not one token; openai: 0-9
    labels: list[str] | None = None
    batch_tokens: int = 8192  # local simulator: padded tokens per forward
    threads: int | None = None  # local: torch CPU threads while describing (1 is far faster on a busy CPU)
    score_uniform: int = 10  # windows drawn uniformly from held-out text (features `uniform`), scored
    # which units: `sample` picks N at random among alive units (a function of seed and the unit set);
    # `units` a list of indices or a file of them (one per line or a JSON list); null = all
    sample: int | None = None
    units: Any = None
    # pos: the unit's positive side; neg: its negative side (signed units: features.jsonl `neg`,
    # bottom-k exemplars), described and scored separately, as the reference does
    polarity: str = "pos"
    tag: str | None = None  # output folder descriptions/<name>-<tag> (several describe runs side by side)


# Keys that change what is computed (the rest only change how it is fetched).
_RESULT_KEYS = ("explainer", "simulator", "explain_top", "score_top", "explain_per_bin", "score_per_bin",
                "explain_random", "score_random", "min_explain", "min_score_firing", "min_score_random",
                "fire_frac", "min_count", "max_items", "detection_threshold", "controls", "seed", "model",
                "temperature", "explain_max_tokens", "top_logprobs", "candidates", "candidate_temperature",
                "candidate_exemplars", "detection_quantiles", "detection_negatives",
                "backend", "embedded", "dtype", "labels", "score_uniform", "sample", "units", "polarity",
                "simulate_max_tokens_per_token", "prompt_logprobs",
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
    for key in ("max_items", "concurrency", "explain_max_tokens", "chunk_units", "candidates",
                "simulate_max_tokens_per_token"):
        if getattr(dc, key) < 1:
            raise UserError(f"config `describe.{key}`: must be >= 1, got {getattr(dc, key)}")
    if dc.candidate_exemplars is not None and dc.candidate_exemplars < 1:
        raise UserError(f"config `describe.candidate_exemplars`: must be >= 1 or null, got "
                        f"{dc.candidate_exemplars}")
    if not all(0 < q < 1 for q in dc.detection_quantiles) or not 0 <= dc.detection_negatives <= 1:
        raise UserError(f"config `describe.detection_quantiles`: probabilities in (0, 1), got "
                        f"{dc.detection_quantiles}; `describe.detection_negatives` in [0, 1]")
    dc.detection_quantiles = sorted(dc.detection_quantiles)
    if dc.max_units is not None and dc.max_units < 1:
        raise UserError(f"config `describe.max_units`: must be >= 1 or null, got {dc.max_units}")
    if not 0 < dc.fire_frac <= 1:
        raise UserError(f"config `describe.fire_frac`: must be in (0, 1], got {dc.fire_frac}")
    if dc.timeout <= 0 or dc.backoff < 0:
        raise UserError("config `describe.timeout` must be > 0 and `describe.backoff` >= 0")
    if dc.top_logprobs > 20:
        raise UserError(f"config `describe.top_logprobs`: at most 20 (OpenAI's limit), got {dc.top_logprobs}")
    if dc.prompt_logprobs not in ("auto", False, "false"):
        raise UserError(f"config `describe.prompt_logprobs`: expected auto or false, "
                        f"got {dc.prompt_logprobs!r}")
    dc.prompt_logprobs = "auto" if dc.prompt_logprobs == "auto" else False
    if dc.polarity not in ("pos", "neg"):
        raise UserError(f"config `describe.polarity`: expected pos or neg, got {dc.polarity!r}")
    if dc.backend not in ("openai", "local"):
        raise UserError(f"config `describe.backend`: expected openai or local, got {dc.backend!r}")
    if dc.sample is not None and dc.sample < 1:
        raise UserError(f"config `describe.sample`: must be >= 1 or null, got {dc.sample}")
    if dc.batch_tokens < 1 or dc.score_uniform < 0 or (dc.threads is not None and dc.threads < 1):
        raise UserError("config `describe.batch_tokens` and `describe.threads` must be >= 1, "
                        "`describe.score_uniform` >= 0")
    if dc.tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", dc.tag):
        raise UserError(f"config `describe.tag`: letters, digits, `_.-` only, got {dc.tag!r}")
    if uses_llm(dc) and dc.backend == "local":
        if not (dc.model or dc.embedded):
            raise UserError("config `describe.model` or `describe.embedded`: required with describe.backend="
                            "local (e.g. describe.embedded=smollm2-135m-instruct or describe.model=PATH)")
    elif uses_llm(dc):
        if not dc.model:
            raise UserError("config `describe.model`: required when describe.explainer or describe.simulator "
                            "is llm (e.g. describe.model=Qwen/Qwen2.5-7B-Instruct)")
        if dc.base_url is not None and not dc.base_url.startswith(("http://", "https://")):
            raise UserError(f"config `describe.base_url`: expected an http(s) URL, got {dc.base_url!r}")
    if dc.seed is None:
        dc.seed = int(cfg.seed)
    if dc.device is None:
        dc.device = resolve_device(str(OmegaConf.select(cfg, "device", default="cpu")))
    return dc


def unit_name(cfg: DictConfig) -> str:
    """The features folder to describe, by the features stage's own rule ("neurons" or the SAE's name)."""
    from tools.top_activations import unit_name as features_unit_name  # imports torch: only when needed

    return features_unit_name(cfg)


# ---------------------------------------------------------------------------------------------
# stage


def _paths(cfg: DictConfig, dc: DescribeConfig) -> tuple[str, Path, Path]:
    name = unit_name(cfg)
    run_dir = Path(cfg.run_dir)
    out = name + ("-neg" if dc.polarity == "neg" else "") + ("" if dc.tag is None else f"-{dc.tag}")
    return name, run_dir / "features" / name, run_dir / "descriptions" / out


def negative_frac(meta: dict[str, Any]) -> float:
    """The features stage's negative threshold (relative to each unit's max), from its meta.json."""
    v = meta.get("negative_frac", DEFAULT_NEGATIVE_FRAC)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
        raise UserError(f"features meta.json: `negative_frac` must be a number in [0, 1), got {v!r}")
    return float(v)


def quantile_probs(meta: dict[str, Any]) -> list[float] | None:
    """The probabilities of each record's `act_quantiles` (features meta.json), when valid."""
    v = meta.get("act_quantiles")
    if isinstance(v, list) and v and all(isinstance(q, (int, float)) and 0 <= q <= 1 for q in v):
        return [float(q) for q in v]
    return None


def _features_meta(feats_dir: Path) -> dict[str, Any]:
    return read_json(feats_dir / "meta.json", "features meta") if (feats_dir / "meta.json").is_file() else {}


def _config_hash(dc: DescribeConfig, features: Path, neg_frac: float = DEFAULT_NEGATIVE_FRAC) -> str:
    fields = asdict(dc)
    return config_hash({"describe": {k: fields[k] for k in _RESULT_KEYS}, "negative_frac": neg_frac,
                        "features": sha256_file(features) if features.is_file() else None})


def done(cfg: DictConfig) -> bool:
    dc = load_config(cfg)
    name, feats, out = _paths(cfg, dc)
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
    dc = load_config(cfg)
    _, feats_dir, out = _paths(cfg, dc)
    fix = "rebuild the features: python -m tools.top_activations overwrite=true"
    with guard.output_lock(out, "tools.describe"):  # one writer, intact and current features
        guard.verify_sealed(feats_dir, ["features.jsonl"], "features", fix)
        guard.check_sealed_inputs(feats_dir, fix)
        if dc.threads is None or not uses_llm(dc) or dc.backend != "local":
            return _run(cfg, dc)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(dc.threads)  # restored after: later stages of a pipeline share the process
        try:
            return _run(cfg, dc)
        finally:
            torch.set_num_threads(before)


def _run(cfg: DictConfig, dc: DescribeConfig) -> dict[str, Any]:
    name, feats_dir, out = _paths(cfg, dc)
    feats = features_path(feats_dir)
    meta = _features_meta(feats_dir)
    layer = meta.get("layer") if isinstance(meta.get("layer"), int) else None
    indices = select_units(feats, scan_indices(feats, dc.max_units), dc, layer)
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
        llm_sim = None
        if uses_llm(dc) and dc.backend == "local":
            client, llm_sim = _local_backend(cfg, dc)
        elif uses_llm(dc):
            client = ChatClient(base_url=dc.base_url, model=str(dc.model), api_key_env=dc.api_key_env,
                                timeout=dc.timeout, max_retries=dc.max_retries, backoff=dc.backoff,
                                concurrency=dc.concurrency, cache_dir=out / "cache" if dc.cache else None)
        describer = Describer(dc, client, chash, neg_frac, llm_sim, quantile_probs(meta))
        writer = RecordWriter(path)
        workers = dc.concurrency if isinstance(client, ChatClient) else 1
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
               "model": model_name(dc), "seed": dc.seed, "max_units": dc.max_units, "tag": dc.tag,
               "negative_frac": neg_frac,
               "config_hash": chash, **summarize(final, len(indices))}
    summary["usage_this_run"] = client.usage.as_dict() if client else {}
    write_json(out / "summary.json", summary)
    if aborted is not None:
        raise ServerUnreachable(f"{aborted} -- {len(final)} finished units are kept in {path}; rerun to "
                                "continue") from None
    print_table(summary)
    figures = flat_figures(summary)
    figures["site"] = _render_site(Path(cfg.run_dir), name) if dc.site else None  # every run shows there
    print(f"describe: {summary['described']} described, {summary['failed']} failed, {summary['skipped']} "
          f"skipped of {summary['units']} units -> {path} (+ summary.json)"
          + (f"; site {figures['site']}" if figures["site"] else ""), flush=True)
    return figures


def _local_backend(cfg: DictConfig, dc: DescribeConfig) -> tuple[Any, Any]:
    """The in-process model (explainer) and its all-at-once simulator; labels checked at start-up."""
    from tools.describe.allatonce import AllAtOnceSimulator  # imports torch + transformers: only here
    from tools.describe.local import LocalLM, LocalModelConfig

    lm = LocalLM(LocalModelConfig(model=dc.model, embedded=dc.embedded, dtype=dc.dtype, device=str(dc.device),
                                  data_dir=str(OmegaConf.select(cfg, "data_dir", default="data")),
                                  batch_tokens=dc.batch_tokens))
    sim = AllAtOnceSimulator(lm, dc.labels) if dc.simulator == "llm" else None
    print(f"describe: local model {model_name(dc)} on {lm.device}"
          + (f", simulator labels {sim.labels[0]}..{sim.labels[-1]}" if sim else ""), flush=True)
    return lm, sim


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
            rec.update(status="skipped", reason=reason, exemplars=exemplar_counts(split))
            finish(rec, usage)
            return
        expl = describer.explain(split, usage, index)
        if not expl.ok:
            rec = describer.base_record(index)
            rec.update(status="failed", reason=expl.reason, raw=expl.raw, prompt_hash=expl.prompt_hash,
                       exemplars=exemplar_counts(split))
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
