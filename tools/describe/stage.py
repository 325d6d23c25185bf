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

import functools
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from tools.core import guard
from tools.core.config import UserError, output_fields, resolve_device, section, stage_main
from tools.core.files import config_hash, read_json, sha256_file, write_json
from tools.core.layout import RunLayout
from tools.core.stage import Stage
from tools.describe.client import ChatClient, ServerUnreachable, Usage
from tools.describe.config import DescribeConfig, uses_llm
from tools.describe.describer import (
    DEFAULT_NEGATIVE_FRAC,
    Describer,
    exemplar_counts,
    model_name,
    pick_other,
)
from tools.describe.exemplars import Split
from tools.describe.explainers import Explanation
from tools.describe.records import FILE, RecordWriter, load_records, rewrite_records
from tools.describe.summary import flat_figures, print_table, summarize
from tools.describe.units import iter_units, select_units
from tools.features.config import unit_name
from tools.features.records import FILE as FEATURES
from tools.features.records import features_path, scan_indices

FORMAT = "monosemantic.descriptions/1"


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


class DescribeStage(Stage):
    """`features/<unit set>/features.jsonl` -> `descriptions/<unit set>[-neg][-<tag>]/`, one line per unit
    (resumed unit by unit), then the site stage renders the unit set with every run."""

    name, what, key, schema = "tools.describe", "descriptions", "describe", DescribeConfig
    marker = "summary.json"

    @functools.cached_property
    def c(self) -> DescribeConfig:
        """The checked `describe` section; a null seed or device is the top-level one."""
        dc = section(self.cfg, self.key, DescribeConfig)
        if dc.seed is None:
            dc.seed = int(self.cfg.seed)
        if dc.device is None:
            dc.device = resolve_device(str(OmegaConf.select(self.cfg, "device", default="cpu")))
        return dc

    @functools.cached_property
    def unit_set(self) -> str:
        return unit_name(self.cfg)

    @property
    def features_dir(self) -> Path:
        return RunLayout.of(self.cfg).features(self.unit_set)

    def output_dir(self) -> Path:
        return RunLayout.of(self.cfg).descriptions(self.unit_set, self.c.polarity, self.c.tag)

    def output_hash(self, neg_frac: float | None = None) -> str:
        """The output fields of `describe`, the features' negative threshold and features.jsonl's sha256."""
        feats = self.features_dir / FEATURES
        if neg_frac is None:
            neg_frac = negative_frac(_features_meta(self.features_dir))
        return config_hash({"describe": output_fields(self.c), "negative_frac": neg_frac,
                            "features": sha256_file(feats) if feats.is_file() else None})

    def done(self) -> bool:
        """A complete run under this config, these features and this `max_units`."""
        out = self.output_dir()
        if not (out / "summary.json").is_file() or not (out / FILE).is_file():
            return False
        try:
            summary = read_json(out / "summary.json", "descriptions summary")
            chash = self.output_hash()
        except UserError:
            return False
        return (summary.get("complete") is True and summary.get("config_hash") == chash
                and summary.get("max_units") == self.c.max_units)

    def verify_inputs(self) -> None:
        """Intact and current features."""
        fix = "rebuild the features: python -m tools.top_activations overwrite=true"
        guard.verify_sealed(self.features_dir, [FEATURES], "features", fix)
        guard.check_sealed_inputs(self.features_dir, fix)

    def guard(self) -> None:
        """Inputs only: records made under another config are set aside by `work()`, not refused."""
        self.verify_inputs()

    def work(self) -> dict[str, Any]:
        dc = self.c
        if dc.threads is None or not uses_llm(dc) or dc.backend != "local":
            return _run(self)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(dc.threads)  # restored after: later stages of a pipeline share the process
        try:
            return _run(self)
        finally:
            torch.set_num_threads(before)

    def after(self, result: dict[str, Any]) -> dict[str, Any]:
        """The site stage (describe.site), after the lock: every run shows there."""
        result["site"] = _render_site(self.cfg) if self.c.site else None
        return result


def done(cfg: DictConfig) -> bool:
    return DescribeStage(cfg).done()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Describe and score the units, then (describe.site) render the site stage with every run."""
    return DescribeStage(cfg).run()


def _run(stage: DescribeStage) -> dict[str, Any]:
    cfg, dc, name, out = stage.cfg, stage.c, stage.unit_set, stage.output_dir()
    feats = features_path(stage.features_dir)
    meta = _features_meta(stage.features_dir)
    layer = meta.get("layer") if isinstance(meta.get("layer"), int) else None
    indices = select_units(feats, scan_indices(feats, dc.max_units), dc, layer)
    neg_frac = negative_frac(meta)
    chash = stage.output_hash(neg_frac)
    path = out / FILE
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
    print(f"describe: {summary['described']} described, {summary['failed']} failed, {summary['skipped']} "
          f"skipped of {summary['units']} units -> {path} (+ summary.json)", flush=True)
    return flat_figures(summary)


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


def _render_site(cfg: DictConfig) -> str | None:
    """Run the site stage for this unit set. The descriptions are complete either way, so a site
    problem is reported, not raised."""
    from tools import site

    try:
        return site.run(cfg)["site"]
    except (UserError, OSError) as e:
        print(f"describe: warning: the site was not re-rendered ({e}); rebuild it with "
              "`python -m tools.site` and the same run_dir and features.* settings", flush=True)
        return None


main = stage_main(run)

if __name__ == "__main__":
    main()
