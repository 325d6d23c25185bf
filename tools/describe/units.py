"""Which units a describe run covers: all, a listed set (`describe.units`), or a random sample of the
alive ones (`describe.sample`), the sample a function of (seed, unit set) only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.core.config import UserError
from tools.describe.exemplars import check_example
from tools.features.records import alive_units, iter_records

if TYPE_CHECKING:
    from tools.describe.config import DescribeConfig

def read_units(spec: Any, layer: int | None = None) -> list[int]:
    """`describe.units`: a list of unit ids, or a file of them (one per line, or a JSON list). An id is
    an index (`123`) or, as in the reference's neuron lists, `layer:index` (`10:123`, or a JSON pair
    `[10, 123]`); ids of other layers than this unit set's `layer` are left out, so one file can
    serve the runs of every layer."""
    where = "config `describe.units`"
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"{where}: {spec} is not a file (give a list or a file of unit ids)")
        where = str(path)
        text = path.read_text(encoding="utf-8")
        try:
            spec = json.loads(text) if text.lstrip().startswith("[") else [
                ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not a JSON list ({e.msg})") from None
    if not isinstance(spec, (list, tuple)) and not hasattr(spec, "__iter__"):
        raise UserError(f"{where}: expected a list of unit ids, got {spec!r}")
    out, other_layers = [], 0
    for item in spec:
        unit_layer, index = _unit_id(item, where)
        if unit_layer is not None and layer is None:
            raise UserError(f"{where}: {item!r} names a layer, but this unit set's features meta.json has "
                            "no `layer`")
        if unit_layer is None or unit_layer == layer:
            out.append(index)
        else:
            other_layers += 1
    if not out and other_layers:
        raise UserError(f"{where}: none of the {other_layers} listed units is in layer {layer} "
                        "(ids are layer:index)")
    return out


def _unit_id(item: Any, where: str) -> tuple[int | None, int]:
    try:
        if isinstance(item, str) and ":" in item:
            a, b = item.split(":", 1)
            return int(a), int(b)
        if isinstance(item, (list, tuple)) or (hasattr(item, "__len__") and not isinstance(item, str)):
            if len(item) != 2:
                raise ValueError
            return int(item[0]), int(item[1])
        if isinstance(item, bool):
            raise ValueError
        return None, int(item)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected a unit id (index or layer:index), got {item!r}") from None


def select_units(feats: Path, indices: list[int], dc: DescribeConfig, layer: int | None = None) -> list[int]:
    """`units` restricts to the listed ones; `sample` then draws N alive units uniformly at random,
    a function of (seed, unit set) only, kept in file order."""
    if dc.units is not None:
        listed = read_units(dc.units, layer)
        missing = sorted(set(listed) - set(indices))
        if missing:
            raise UserError(f"config `describe.units`: {missing[:5]} not in {feats}")
        keep = set(listed)
        indices = [i for i in indices if i in keep]
    if dc.sample is not None:
        alive = sorted(alive_units(feats, indices))
        rng = np.random.default_rng([int(dc.seed or 0), 0x5A4D])
        n = min(dc.sample, len(alive))
        chosen = set(rng.choice(alive, size=n, replace=False).tolist()) if alive else set()
        indices = [i for i in indices if i in chosen]
        if not indices:
            raise UserError(f"{feats}: no alive unit to sample (describe.sample={dc.sample})")
    return indices


def check_unit(rec: dict[str, Any]) -> None:
    """Every exemplar of a features record is well-formed (ValueError/TypeError naming which is not)."""
    for key in ("top", "random", "uniform"):
        for n, ex in enumerate(rec.get(key) or []):
            check_example(ex, f"{key}[{n}]")
    for b, q in enumerate(rec.get("quantiles") or []):
        for n, ex in enumerate(q.get("examples") or []):
            check_example(ex, f"quantiles[{b}].examples[{n}]")


def iter_units(feats: Path, wanted: set[int], max_units: int | None) -> Iterator[dict[str, Any]]:
    """Parsed, validated records of the units in `wanted`; other lines are skipped unparsed."""
    return iter_records(feats, wanted, max_units, check=check_unit)
