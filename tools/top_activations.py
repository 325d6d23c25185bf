"""Top activations of every SAE feature (or MLP neuron) over held-out text, and the feature site.

`python -m tools.top_activations run_dir=runs/demo [features.unit=neuron]` streams the val split
through the model (and the SAE) once, in batches, keeping per unit only running statistics whose
size does not grow with the tokens scanned:

* top-k contexts by their max activation (one running top-k of [units, k]);
* an exact activation histogram: 64 equal-width bins over [0, R], R a power of two >= the running
  max; when the max passes R, R doubles and adjacent bins merge (counts stay exact);
* a uniform sample of firing tokens per histogram bin (bottom-m random keys, merged the same way),
  from which the quantile-bin examples are drawn at the end. Bins are **equal-width** over
  (0, max_act] (as in Anthropic 2023's activation intervals); each example is drawn uniformly from
  the firing tokens whose activation falls in the bin (weights = bin count / sampled, so partially
  covered histogram bins are not over-represented), preferring contexts not already shown;
* negatives for scoring, contexts where the unit stays at or below `negative_frac` x its own
  final max activation: a uniform sample of the contexts where it never fires (kept per unit, over
  the whole scan; an SAE feature's usual negatives), topped up at the end from a uniform sample of
  candidate contexts shared by all units, whose per-context max of every unit is kept ([candidates
  x units]), since the threshold is known only once the pass is over. A GELU neuron is almost never
  <= 0 over a whole context, so its negatives come from the candidates;
* density (fraction of tokens with activation > 0) and the mean activation over firing tokens.

Windows (`window` tokens each side, shifted to stay inside the context so every window has the
same length) are then recomputed for the chosen contexts only. Logit effects are the direct path
of a unit's output direction: a neuron's column of the MLP's output projection (our GPT's c_proj, a
Llama's down_proj), a dictionary feature's decoder row (through that projection when the dictionary
reads the neurons), then the final norm's scale and W_U. This ignores the norm's centering and
normalisation (and any later layers), as the "logit weights" of Anthropic (2023) and sae_vis do.

Signed units (neurons: GELU, SiLU-gated Llama MLPs) also get their negative side, the same
statistics of the negated activations: bottom-k contexts by min, equal-width bins over
[min_act, 0), and contexts that stay above `negative_frac` x min_act. Both sides are one state of
twice the units, so each (token, unit) entry is read once and goes to the side of its sign. Every
unit gets quantiles of its activation over all scanned tokens, estimated from the exact histograms.

Several unit sets in one pass: `features.layers=[0,10,20]` (or `all`) for neurons, or
`features.sae=[a,b]` for several SAEs of one subject, feed every set's state from one forward per
batch (stopping after the last hook point read) and write one feature set per unit set, each the one
a single-set run writes. `features.memory_gb` bounds the states held together: sets that do not fit
are scanned in further passes (tools/features/memory.py). Under `torchrun` the batches are split
across ranks and the states merged exactly (tools/features/merge.py); the window pass is split too,
and rank 0 writes, so the output is the one of a single process.

On CUDA the states are updated without a host sync per batch (every unit every batch, the same
result); on the CPU a worker thread folds in one batch while the next batch's forward runs.

Modules: tools/features/{config (the section), source (model, SAE and tokens: the stage's only
model access), scan (a unit set's running state), one_pass (the pass over the contexts), merge
(ranks' states), memory (passes that fit), select (choosing examples), write (records and meta)}.
Writes `run_dir/features/<name>/{features.jsonl, meta.json}` (docs/formats.md), then runs the site
stage (`tools.site`), which renders `site/` beside them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tools.core import guard
from tools.core.config import UserError, output_fields, resolve_device, section, stage_main
from tools.core.distributed import Dist
from tools.core.files import config_hash, read_json, sha256_file, write_json
from tools.core.layout import RunLayout
from tools.core.stage import Stage
from tools.features.config import FeaturesConfig, unit_name
from tools.features.source import Inputs, load_inputs
from tools.features.write import scan_and_write


class FeaturesStage(Stage):
    """Subject (+ SAE) and tokens -> `run_dir/features/<unit set>/`, then the site stage renders `site/`."""

    name, what, key, schema = "tools.top_activations", "feature set", "features", FeaturesConfig
    marker = "meta.json"
    sealed = ("features.jsonl",)

    @functools.cached_property
    def sets(self) -> list[FeaturesStage]:
        """One stage per unit set the config names (itself, unless features.layers / a list of SAEs)."""
        cfgs = unit_configs(self.cfg)
        return [self] if cfgs[0] is self.cfg else [FeaturesStage(c) for c in cfgs]

    def output_dir(self) -> Path:
        if self.sets[0] is not self:
            return self.sets[0].output_dir()
        return RunLayout.of(self.cfg).features(unit_name(self.cfg))

    def run(self) -> dict[str, Any]:
        """One unit set in one process: the stage skeleton; several, or under torchrun: `run_sets`."""
        if len(self.sets) == 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return super().run()
        return run_sets(self.sets)

    def current(self) -> bool:
        """Whether features.jsonl is current (the site may still be missing)."""
        out = self.output_dir()
        return ((out / "meta.json").is_file() and (out / "features.jsonl").is_file()
                and self.recorded_hash() == self.output_hash())

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The subject's tokenizer (GPT-2 for our GPT): token text on the pages, checked against tokens."""
        from transformer.subject_load import subject_config
        from transformer.tokenizer import load_tokenizer

        return load_tokenizer(subject_config(self.cfg), str(self.cfg.data_dir))

    @functools.cached_property
    def inp(self) -> Inputs:
        """Model, SAE and tokens, loaded (the stage's only model access)."""
        device = resolve_device(self.cfg.get("device", "auto"))
        return load_inputs(self.cfg, self.c, unit_name(self.cfg), device,
                           fingerprint=self.tokenizer.fingerprint)

    def output_hash(self, files: dict[str, str] | None = None) -> str:
        """The output fields of `features`, the seed and the sha256 of the input files (`inp.files`
        unless given: the ones a finished feature set recorded)."""
        if files is None:
            return self._loaded_hash
        hook = {"sae_hook": self.c.sae_hook} if self.c.sae_hook else {}  # hashed only when set
        return config_hash({"features": output_fields(self.c), "seed": int(self.cfg.seed), **hook,
                            "files": {k: sha256_file(v) for k, v in sorted(files.items())}})

    @functools.cached_property
    def _loaded_hash(self) -> str:
        return self.output_hash(self.inp.files)  # the inputs hashed once per run

    def done(self) -> bool:
        """Complete when meta.json's hash matches this config and inputs, and the site exists."""
        if self.sets[0] is not self:
            return all(st.done() for st in self.sets)
        try:
            fc, out = self.c, self.output_dir()
            if not (out / "meta.json").is_file() or not (out / "features.jsonl").is_file():
                return False
            if not (RunLayout.of(self.cfg).site(out.name) / "index.html").is_file():
                return False
            meta = read_json(out / "meta.json", "features meta")
            files = meta.get("inputs", {})
            roles = set(files) - {"sae_config"}  # an external dictionary's config file, beside its weights
            if roles != ({"model", "tokens"} | ({"sae"} if fc.unit == "sae" else set())):
                return False
            if not all(Path(p).is_file() for p in files.values()):
                return False
            if (meta.get("config") or {}).get("pages") != fc.pages:
                return False
            return meta.get("config_hash") == self.output_hash(files)
        except UserError:
            return False

    def verify_inputs(self) -> None:
        """The model, SAE and tokens intact (their sealed checksums)."""
        for role, p in self.inp.files.items():
            guard.verify_sealed(Path(p).parent, [Path(p).name], role)

    def inputs(self) -> dict[str, Any] | None:
        return read_json(self.output_dir() / "meta.json").get("inputs")

    def work(self) -> dict[str, Any]:
        return _run(self)

    def after(self, result: dict[str, Any]) -> dict[str, Any]:
        """The site stage, under its own lock."""
        from tools.site import SiteStage

        result["site"] = SiteStage(self.cfg).run()["site"]
        return result


def done(cfg: DictConfig) -> bool:
    """Complete when meta.json's hash matches this config and inputs, and the site exists."""
    return FeaturesStage(cfg).done()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Scan (unless the feature set is current), seal features.jsonl, then render the site stage."""
    return FeaturesStage(cfg).run()


def unit_configs(cfg: DictConfig) -> list[DictConfig]:
    """The config of each unit set `cfg` names: [cfg] itself for one; for `features.layers` one per
    layer (`features.layer=<L>`), for a list in `features.sae` one per SAE, each exactly the config
    of a single-set run (so its hash and output are that run's)."""
    from omegaconf import OmegaConf

    fc = section(cfg, "features", FeaturesConfig)
    if not fc.several():
        return [cfg]
    if fc.layers is not None:
        from transformer.subject_load import subject_spec

        spec = subject_spec(cfg)
        layers = list(range(spec.n_layers)) if fc.layers == "all" else list(fc.layers)
        spec.check_layers(layers, "features.layers")
        sets = [{"features.layers": None, "features.layer": layer} for layer in layers]
    else:
        sets = [{"features.sae": name} for name in fc.sae]
    out = []
    for overrides in sets:
        c = cfg.copy()
        for key, value in overrides.items():
            OmegaConf.update(c, key, value, merge=False)
        out.append(c)
    return out


def _finish(stage: FeaturesStage, meta: dict[str, Any], secs: float) -> dict[str, Any]:
    fc, out = stage.c, stage.output_dir()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"features: {meta['n_units']} {'neurons' if fc.unit == 'neuron' else 'SAE features'} "
              f"of layer {meta['layer']} ({meta['alive']} alive"
              f"{', both signs' if meta.get('negative_side') else ''}) "
              f"over {meta['tokens_scanned']:,} tokens "
              f"-> {out / 'features.jsonl'} ({secs:.1f} s)")
    return {"name": out.name, "unit": fc.unit, "units": meta["n_units"], "alive": meta["alive"],
            "tokens_scanned": meta["tokens_scanned"], "scan_tokens_per_s": meta["scan_tokens_per_s"]}


def _current_meta(stage: FeaturesStage) -> dict[str, Any]:
    """The meta.json of a current feature set (pages, which the hash leaves out, brought up to date)."""
    meta_path = stage.output_dir() / "meta.json"
    meta = read_json(meta_path)
    print(f"features for {stage.output_dir().name} are up to date; the site only follows")
    if (meta.get("config") or {}).get("pages") != stage.c.pages:
        meta["config"] = {**meta.get("config", {}), "pages": stage.c.pages}
        if int(os.environ.get("RANK", "0")) == 0:
            write_json(meta_path, meta)
    return meta


def _run(stage: FeaturesStage) -> dict[str, Any]:
    from tools.tokens import TokenText

    t0 = time.perf_counter()
    if stage.current():
        meta = _current_meta(stage)
    else:
        tok = stage.tokenizer
        meta = scan_and_write(stage.cfg, stage.c, stage.output_dir().name, stage.inp, stage.output_dir(),
                              stage.output_hash(), TokenText(tok), {"tokenizer_info": tok.describe()})
    return _finish(stage, meta, time.perf_counter() - t0)


def run_sets(stages: list[FeaturesStage]) -> dict[str, Any]:
    """Several unit sets (and/or several ranks): every set not current scanned together, in as few
    passes as `features.memory_gb` allows, one feature set written (and sealed) per unit set, then
    each set's site. Under torchrun rank 0 locks, writes and renders."""
    from tools.features import memory
    from tools.features.one_pass import scan_sets
    from tools.features.source import load_shared, unit_inputs
    from tools.features.write import write_set
    from tools.tokens import TokenText

    first = stages[0]
    dist = Dist.start(resolve_device(first.cfg.get("device", "auto")))
    device = dist.device(resolve_device(first.cfg.get("device", "auto")))
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    try:
        with contextlib.ExitStack() as locks:
            for st in stages:
                locks.enter_context(guard.output_lock(st.output_dir(), st.name))
            todo = [st for st in stages if not st.current()]
            for st in stages:
                if st not in todo:
                    results[st.output_dir().name] = _finish(st, _current_meta(st), 0.0)
            if todo:
                tok = first.tokenizer
                shared = load_shared(first.cfg, first.c, device, fingerprint=tok.fingerprint)
                for st in todo:
                    st.__dict__["inp"] = unit_inputs(st.cfg, st.c, st.output_dir().name, shared, device)
                    st.verify_inputs()
                    if dist.master and (st.output_dir() / st.marker).is_file():
                        st.guard()
                dist.barrier()
                fc = first.c
                both = fc.both_sides()
                sizes = [memory.set_bytes(st.inp.n_units, shared.model.width(st.inp.hook), fc, shared.n_ctx,
                                          shared.T, both) for st in todo]
                budget = fc.memory_gb * memory.GB if fc.memory_gb else memory.default_budget(device)
                names = [st.output_dir().name for st in todo]
                passes = memory.plan_passes(names, sizes, budget)
                if dist.master:
                    print(f"features: {len(todo)} unit set(s) in {len(passes)} pass(es) over the text "
                          f"({max(h + w for h, w in sizes) / memory.GB:.3g} GB per set at most, budget "
                          f"{budget / memory.GB:.3g} GB{' = features.memory_gb' if fc.memory_gb else ''}"
                          f"{f', {dist.world} ranks' if dist.world > 1 else ''})", flush=True)
                text = TokenText(tok)
                for group in passes:
                    t1 = time.perf_counter()
                    sets = [todo[i] for i in group]
                    sides, rate = scan_sets([st.inp for st in sets], fc, int(first.cfg.seed), device, both,
                                            dist)
                    for st, side in zip(sets, sides, strict=True):
                        meta = write_set(st.cfg, st.c, st.output_dir().name, st.inp, st.output_dir(),
                                         st.output_hash(), text, side, rate, device,
                                         {"tokenizer_info": tok.describe()}, dist)
                        if dist.master:
                            st.seal()
                        results[st.output_dir().name] = _finish(st, meta, time.perf_counter() - t1)
                    del sides
        dist.barrier()
        if dist.master:
            for st in stages:
                results[st.output_dir().name] = st.after(results[st.output_dir().name])
    finally:
        dist.close()
    if len(stages) == 1:
        return results[stages[0].output_dir().name]
    return {"sets": results, "units": sum(r["units"] for r in results.values()),
            "seconds_scan_and_write": round(time.perf_counter() - t0, 1)}


main = stage_main(run)

if __name__ == "__main__":
    main()
