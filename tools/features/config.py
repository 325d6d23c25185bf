"""The `features` config section, the constants of the stage, and which unit set a run names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from tools.core.config import UserError, neutral, section
from tools.core.layout import RunLayout
from tools.features.dictionary import external_name, is_external

FORMAT_META = "monosemantic.features/1"
HIST_BINS = 64  # internal histogram resolution (see the module docstring)
UNITS = ("sae", "neuron")
ACT_QUANTILES = (0.0001, 0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
NEGATIVES = ("contexts whose max activation is <= {frac} x the unit's max_act: first a uniform sample of "
             "the contexts where the unit never fires (> 0 nowhere), then, if fewer than n_random, random "
             "contexts under the threshold among {cand} candidate contexts sampled uniformly up front")


@dataclass
class FeaturesConfig:
    unit: str = "sae"  # sae | neuron (the MLP's own neurons)
    # folder name under run_dir/sae (null = the only one there), or any dictionary's folder / file path or
    # hub id hf:ORG/REPO[/SUBPATH] (docs/bring-your-own-dictionary.md); a list: several dictionaries
    # scanned in one pass over the text (one forward for all), one feature set each
    sae: Any = None
    # the hook point (blocks.<L>.<site>) a dictionary reads, where its files record none (or to replace the
    # one they record). Hashed by the stage when set (tools.top_activations output_hash)
    sae_hook: str | None = neutral(None)
    layer: int = 0  # neurons: which layer's MLP (an SAE uses the layer of its hook_name)
    # neurons of several layers in one pass (one forward, stopping after the last listed layer), one
    # feature set per layer, each the same as `layer=<L>` writes: a list of layers, or `all`
    layers: Any = None
    # memory for the scan's running state (GB); sets that do not fit together are scanned in several
    # passes; null = most of the device's free memory
    memory_gb: float | None = neutral(None)
    split: str = "val"  # token split scanned (held-out text, not the SAE's training rows)
    contexts: int | None = None  # contexts scanned; null = every whole context in the split
    context_len: int | None = None  # tokens per context; null = the model's block_size
    batch_tokens: int = 16384  # tokens per forward pass (rounded down to whole contexts)
    top_k: int = 20  # top contexts per unit, by max activation
    bins: int = 10  # equal-width activation bins over (0, max_act]
    per_bin: int = 5  # examples per bin
    n_random: int = 20  # random negative contexts (max activation <= negative_frac x the unit's max)
    negative_frac: float = 0.1  # a context is a negative when its max is <= this x the unit's max_act
    # windows at (context, position) drawn uniformly from the scanned text, the same ones for every
    # unit whatever it does there (Bills et al.'s "random" scoring windows; `uniform` in features.jsonl)
    n_uniform: int = 10
    negative_candidates: int = 512  # contexts sampled up front whose per-unit max is kept (top-up negatives)
    window: int = 32  # tokens on each side of the hit
    logit_k: int = 10  # top positive and negative logit effects
    unit_chunk: int = neutral(1024)  # units whose examples are built together (bounds memory)
    # feature pages to render; null = all (the index lists all). Not hashed: meta.json records it
    # and the site follows it
    pages: list[int] | None = neutral(None)
    dtype: str = "float32"  # float32 | bfloat16 (CUDA) for the model + SAE forward
    # also the negative side (bottom-k by min, bins below 0, its own negatives): signed units such as
    # GELU / SiLU-gated (Llama) neurons; null = for neurons, not for SAE features (never below 0)
    negative_side: bool | None = None
    # per-unit activation quantiles over every scanned token (signed), estimated from the histograms
    act_quantiles: list[float] = field(default_factory=lambda: list(ACT_QUANTILES))

    def check(self) -> FeaturesConfig:
        if self.unit not in UNITS:
            raise UserError(f"features.unit must be one of {list(UNITS)}, not {self.unit!r}")
        for key in ("batch_tokens", "top_k", "bins", "per_bin", "logit_k", "unit_chunk"):
            if getattr(self, key) < 1:
                raise UserError(f"features.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("n_random", "window", "layer", "negative_candidates", "n_uniform"):
            if getattr(self, key) < 0:
                raise UserError(f"features.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("contexts", "context_len"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"features.{key} must be >= 1 or null, got {getattr(self, key)}")
        if not 0 <= self.negative_frac < 1:
            raise UserError(f"features.negative_frac must be in [0, 1), got {self.negative_frac}")
        if not all(0 <= q <= 1 for q in self.act_quantiles):
            raise UserError(f"features.act_quantiles must be in [0, 1], got {self.act_quantiles}")
        self._check_sets()
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise UserError(f"features.memory_gb must be > 0 or null, got {self.memory_gb}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"features.dtype must be float32 or bfloat16, not {self.dtype!r}")
        return self

    def _check_sets(self) -> None:
        sae, layers = self.sae, self.layers
        if sae is not None and not isinstance(sae, str) and not (
                isinstance(sae, list) and sae and all(isinstance(x, str) for x in sae)):
            raise UserError(f"features.sae must be an SAE's folder name, a non-empty list of them, or null; "
                            f"got {sae!r}")
        if layers is None:
            return
        if self.unit != "neuron":
            raise UserError("features.layers lists neuron layers (features.unit=neuron); an SAE's layer is "
                            "its hook's: list several SAEs with features.sae=[...]")
        if layers != "all" and not (isinstance(layers, list) and layers and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)):
            raise UserError(f"features.layers must be `all` or a non-empty list of layers >= 0, "
                            f"got {layers!r}")
        if isinstance(layers, list) and len(set(layers)) != len(layers):
            raise UserError(f"features.layers lists a layer twice: {layers}")

    def several(self) -> bool:
        """Whether the config names several unit sets (features.layers, or a list in features.sae)."""
        return self.layers is not None or isinstance(self.sae, list)

    def both_sides(self) -> bool:
        """Whether the negative side is scanned (see `negative_side`)."""
        return self.unit == "neuron" if self.negative_side is None else self.negative_side


def unit_name(cfg: DictConfig) -> str:
    """Folder name under run_dir/features and run_dir/descriptions (`RunLayout.unit_set`): "neurons"
    (our GPT's layer 0), "neurons-L<layer>" (any other layer or subject), the SAE's name, or the folder
    name of a dictionary given by path or hub id."""
    fc = section(cfg, "features", FeaturesConfig)
    if fc.several():
        raise UserError("features.layers / a list in features.sae name several unit sets; each has its own "
                        "name (tools.top_activations.unit_configs)")
    if fc.unit == "sae" and is_external(fc.sae):
        return external_name(fc.sae)
    gpt = str((cfg.get("subject") or {}).get("kind", "gpt")) == "gpt"
    return RunLayout.of(cfg).unit_set(fc.unit, layer=fc.layer, gpt=gpt, sae=fc.sae)
