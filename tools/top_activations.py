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
of a unit's output direction: decoder row (SAE) or W_out column (neuron) through c_proj, the final
LayerNorm's scale, and W_U. This ignores LayerNorm centering and normalisation (and any later
layers), as the "logit weights" of Anthropic (2023) and sae_vis do.

Signed units (neurons: GELU, SiLU-gated Llama MLPs) also get their negative side, the same
statistics of the negated activations: bottom-k contexts by min, equal-width bins over
[min_act, 0), and contexts that stay above `negative_frac` x min_act. Every unit gets quantiles
of its activation over all scanned tokens, estimated from the exact histograms.

Modules: tools/features/{config (the section), source (model, SAE and tokens: the stage's only
model access), scan (the streaming pass), select (choosing examples), write (records and meta)}.
Writes `run_dir/features/<name>/{features.jsonl, meta.json}` (docs/formats.md), then runs the site
stage (`tools.site`), which renders `site/` beside them.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tools.core import guard
from tools.core.config import UserError, output_fields, resolve_device, stage_main
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

    def output_dir(self) -> Path:
        return RunLayout.of(self.cfg).features(unit_name(self.cfg))

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


def _run(stage: FeaturesStage) -> dict[str, Any]:
    from tools.tokens import TokenText

    t0 = time.perf_counter()
    cfg, fc, out = stage.cfg, stage.c, stage.output_dir()
    name = out.name
    chash = stage.output_hash()
    meta_path = out / "meta.json"
    if meta_path.is_file() and (out / "features.jsonl").is_file() and stage.recorded_hash() == chash:
        meta = read_json(meta_path)
        print(f"features for {name} are up to date; the site only follows")
        if (meta.get("config") or {}).get("pages") != fc.pages:  # pages are not part of the hash
            meta["config"] = {**meta.get("config", {}), "pages": fc.pages}
            write_json(meta_path, meta)
    else:
        tok = stage.tokenizer
        meta = scan_and_write(cfg, fc, name, stage.inp, out, chash, TokenText(tok),
                              {"tokenizer_info": tok.describe()})
    secs = time.perf_counter() - t0
    print(f"features: {meta['n_units']} {'neurons' if fc.unit == 'neuron' else 'SAE features'} "
          f"of layer {meta['layer']} ({meta['alive']} alive"
          f"{', both signs' if meta.get('negative_side') else ''}) over {meta['tokens_scanned']:,} tokens "
          f"-> {out / 'features.jsonl'} ({secs:.1f} s)")
    return {"name": name, "unit": fc.unit, "units": meta["n_units"], "alive": meta["alive"],
            "tokens_scanned": meta["tokens_scanned"], "scan_tokens_per_s": meta["scan_tokens_per_s"]}


main = stage_main(run)

if __name__ == "__main__":
    main()
