"""Each default lives in one place: the dataclasses of conf/schema.py, not again in conf/**/*.yaml.

Fails when a YAML option repeats a dataclass default (two copies that can drift), when the default
option of a group changes a value other than the ones it exists for, or when what the command line
composes for a section differs from the dataclass that tests and benchmarks build directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conf.schema import GROUPS
from tools.core.config import CONF_DIR, compose

# the default option of a group may set these (what it is for); every other key is the dataclass's
DEFAULT_OPTION_SETS = {"data": {"val_files"}}  # the Shakespeare option's four held-out plays


def _defaults(schema: type) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema))


def _options(group: str) -> list[Path]:
    return sorted((Path(CONF_DIR) / group).glob("*.yaml"))


def _default_option(group: str) -> str:
    for entry in OmegaConf.load(Path(CONF_DIR) / "config.yaml").defaults:
        if isinstance(entry, dict) and group in entry:
            return str(entry[group])
    raise AssertionError(f"conf/config.yaml names no default for {group}")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_yaml_does_not_repeat_a_dataclass_default(group):
    base = _defaults(GROUPS[group])
    for path in _options(group):
        raw = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}
        unknown = sorted(set(raw) - set(base))
        assert not unknown, f"{path}: keys {unknown} are not fields of {GROUPS[group].__name__}"
        same = sorted(k for k, v in raw.items() if v == base[k])
        assert not same, (f"{path} repeats the default of {same} ({GROUPS[group].__name__} holds it): "
                          "drop the line, or change the dataclass")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_command_line_composes_the_dataclass_defaults(group):
    """`python -m <stage>` with no overrides sees the dataclass defaults (`SAETrainConfig()` is the CLI's)."""
    composed = OmegaConf.to_container(compose([])[group])
    base = _defaults(GROUPS[group])
    allowed = DEFAULT_OPTION_SETS.get(group, set())
    differ = {k: (base.get(k), composed.get(k)) for k in set(base) | set(composed)
              if k not in allowed and base.get(k) != composed.get(k)}
    assert not differ, (f"{group}={_default_option(group)}: the command line composes other values than "
                        f"{GROUPS[group].__name__}'s defaults (dataclass, composed): {differ}")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_option_composes_every_key(group):
    fields = {f.name for f in dataclasses.fields(GROUPS[group])}
    for path in _options(group):
        overrides = [f"{group}={path.stem}"] + (["describe.model=m"] if path.stem == "openai" else [])
        assert set(compose(overrides)[group]) == fields, path


def test_overrides_need_no_plus_and_unknown_keys_are_named():
    assert compose(["sae.lr=3e-4", "sae=topk"]).sae.lr == 3e-4
    with pytest.raises(Exception, match="sae.lrr"):
        compose(["sae.lrr=1"])


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_sparse_groups_step_the_decoder_faster_and_demo_gives_auxk_its_window(arch):
    """The measured recipe (docs/sae-training.md, the architecture frontier): the decoder at 12x lr,
    AuxK at weight 1/8 for the k-sparse kinds; the demo preset's AuxK window is 16
    steps while l1's resampling keeps its own dead_tokens; the schema (and so l1) keeps Gao et al.'s
    values."""
    sae = compose(["preset=demo", f"sae={arch}"]).sae
    assert sae.decoder_lr_scale == 12
    assert sae.aux_coeff == (0.03125 if arch == "jumprelu" else 0.125)
    assert (sae.aux_dead_tokens, sae.dead_tokens) == (8192, 128000)
    assert sae.aux_dead_tokens // sae.batch_size == 16
    l1 = compose(["preset=demo"]).sae
    assert (l1.architecture, l1.decoder_lr_scale, l1.aux_coeff) == ("l1", 1.0, 0.03125)
