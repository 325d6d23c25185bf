"""The run folder's layout and names, in one place (docs/formats.md).

    run_dir/
      transformer/{model.safetensors, config.json, checkpoint/}
      activations/<split>/                one hook point: the shards themselves
      activations/<split>/<hook_name>/    several hook points: one shard folder each
      sae/<name>/                         cfg.json, sae_weights.safetensors, checkpoint/
      features/<unit set>/{features.jsonl, meta.json, site/}
      descriptions/<unit set>[-neg][-<tag>]/{descriptions.jsonl, summary.json}
      logs/, pipeline.json, summary.md, sweep/

A unit set is named `neurons` (our GPT's layer 0), `neurons-L<layer>` (any other layer or subject)
or after its SAE's folder. Under data_dir, the token folders are `transformer.data.token_dir(cfg)` and
converted models `transformer.hf_load.converted_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.core.config import UserError
from tools.core.files import read_json

SHARD_MANIFEST = "manifest.json"  # autoencoder.shards.MANIFEST: marks a finished shard folder
POLARITIES = ("pos", "neg")


def neurons_name(layer: int, gpt: bool = True) -> str:
    """The unit set of a layer's MLP neurons: `neurons` for our GPT's layer 0, else `neurons-L<layer>`."""
    return "neurons" if gpt and layer == 0 else f"neurons-L{layer}"


def neurons_layer(name: str, gpt: bool = True) -> int | None:
    """The layer of a neuron unit set's name (the inverse of `neurons_name`); None for any other name."""
    if name == "neurons":
        return 0 if gpt else None
    digits = name.removeprefix("neurons-L")
    if digits == name or not digits.isdigit() or str(int(digits)) != digits:
        return None
    return int(digits)


def describe_folder(name: str, polarity: str = "pos", tag: str | None = None) -> str:
    """A describe run's folder under descriptions/: `<name>[-neg][-<tag>]`."""
    if polarity not in POLARITIES:
        raise UserError(f"describe.polarity must be one of {list(POLARITIES)}, not {polarity!r}")
    return name + ("-neg" if polarity == "neg" else "") + ("" if tag is None else f"-{tag}")


def describe_polarity(folder: str, name: str, tag: str | None = None) -> str | None:
    """The side of unit set `name` whose run with `tag` lives in `folder` (the inverse of
    `describe_folder`); None when `folder` is no such run."""
    for polarity in POLARITIES:
        if folder == describe_folder(name, polarity, tag):
            return polarity
    return None


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run: `run_dir` (what the stages write) and `data_dir` (tokens and models)."""

    run_dir: Path
    data_dir: Path = Path("data")

    @classmethod
    def of(cls, cfg: Any) -> RunLayout:
        """The layout of a config's `run_dir` and `data_dir`."""
        data_dir = cfg.get("data_dir") if hasattr(cfg, "get") else None
        return cls(Path(str(cfg.run_dir)), Path(str(data_dir or "data")))

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "data_dir", Path(self.data_dir))

    # -- transformer ------------------------------------------------------------------------------
    @property
    def transformer(self) -> Path:
        """Our GPT's folder: model.safetensors + config.json."""
        return self.run_dir / "transformer"

    @property
    def transformer_checkpoint(self) -> Path:
        """The LM trainer's resume state."""
        return self.transformer / "checkpoint"

    # -- activations ------------------------------------------------------------------------------
    def activations_split(self, split: str) -> Path:
        """`activations/<split>/`: the shards of one hook point, or one subfolder per hook point."""
        return self.run_dir / "activations" / str(split)

    def activation_hook_dirs(self, split: str, hooks: list[str]) -> dict[str, Path]:
        """Where a generation writes each hook's shards: one hook, the split folder itself; several,
        one subfolder per hook."""
        base = self.activations_split(split)
        return {hooks[0]: base} if len(hooks) == 1 else {h: base / h for h in hooks}

    def activations(self, split: str, hook: str | None = None) -> Path:
        """Where a split's shards of `hook` are, in either layout (None: the single-hook folder)."""
        base = self.activations_split(split)
        if hook is None:
            return base
        m = base / SHARD_MANIFEST
        if m.is_file() and read_json(m).get("hook_name") == hook:
            return base
        if (base / hook / SHARD_MANIFEST).is_file():
            return base / hook
        have = sorted(p.parent.name for p in base.glob(f"*/{SHARD_MANIFEST}"))
        if m.is_file():
            have.append(str(read_json(m).get("hook_name")))
        raise UserError(f"no activations of {hook} in {base} (found: {', '.join(have) or 'none'}; "
                        "run autoencoder.generate with activations.hook / activations.layers)")

    # -- SAEs -------------------------------------------------------------------------------------
    @property
    def sae_root(self) -> Path:
        return self.run_dir / "sae"

    def sae(self, name: str) -> Path:
        """`sae/<name>/`."""
        return self.sae_root / name

    def sae_names(self) -> list[str]:
        """The finished or running SAEs (folders with a cfg.json), sorted."""
        root = self.sae_root
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "cfg.json").is_file())

    # -- features and the site --------------------------------------------------------------------
    def unit_set(self, unit: str, *, layer: int = 0, gpt: bool = True, sae: str | None = None) -> str:
        """The unit set's name: `neurons_name(layer, gpt)` for neurons; for SAE features `sae`, or the
        only SAE there is (UserError naming the choices otherwise)."""
        if unit == "neuron":
            return neurons_name(layer, gpt)
        names = self.sae_names()
        if sae is not None:
            if not self.sae(sae).is_dir():
                raise UserError(f"features.sae={sae!r}: no folder {self.sae(sae)} "
                                f"(SAEs there: {names or 'none'})")
            return sae
        if not names:
            raise UserError(f"no SAE found under {self.sae_root} "
                            "(run autoencoder.train first, or use features.unit=neuron)")
        if len(names) > 1:
            raise UserError(f"several SAEs under {self.sae_root}: {names}; choose one with features.sae=NAME")
        return names[0]

    def features(self, name: str) -> Path:
        """`features/<unit set>/`: features.jsonl + meta.json."""
        return self.run_dir / "features" / name

    def site(self, name: str) -> Path:
        """The unit set's feature browser, `features/<unit set>/site/`."""
        return self.features(name) / "site"

    # -- descriptions -----------------------------------------------------------------------------
    @property
    def descriptions_root(self) -> Path:
        return self.run_dir / "descriptions"

    def descriptions(self, name: str, polarity: str = "pos", tag: str | None = None) -> Path:
        """`descriptions/<name>[-neg][-<tag>]/`: one describe run of a unit set."""
        return self.descriptions_root / describe_folder(name, polarity, tag)

    def description_candidates(self, name: str) -> list[Path]:
        """Folders that may hold runs of unit set `name` (`<name>` or `<name>-...`) with a
        descriptions.jsonl; which of them really are is decided from their summary.json."""
        root = self.descriptions_root
        if not root.is_dir():
            return []
        return sorted(d for d in root.iterdir() if (d.name == name or d.name.startswith(name + "-"))
                      and (d / "descriptions.jsonl").is_file())

    # -- the pipeline and logs --------------------------------------------------------------------
    @property
    def pipeline_state(self) -> Path:
        """`pipeline.json`: each stage's summary."""
        return self.run_dir / "pipeline.json"

    @property
    def summary(self) -> Path:
        """`summary.md`: the pipeline's final table."""
        return self.run_dir / "summary.md"

    @property
    def sweep(self) -> Path:
        """The L1 sweep's comparison page folder."""
        return self.run_dir / "sweep"

    def logs(self, *parts: str) -> Path:
        """`logs/<parts...>`."""
        return self.run_dir.joinpath("logs", *parts)
