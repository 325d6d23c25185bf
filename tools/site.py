"""The site stage: the static feature browser of one unit set, with every description run of it.

    python -m tools.site run_dir=runs/demo features.sae=l1              # an SAE's features
    python -m tools.site run_dir=runs/demo features.unit=neuron         # the MLP's neurons (layer 0)
    python -m tools.site run_dir=runs/demo features.unit=neuron features.layer=3

Reads `features/<unit set>/{features.jsonl, meta.json}` (the features stage) and every run under
`descriptions/` registered for that unit set (`descriptions/<name>[-neg][-<tag>]/`, docs/formats.md),
and writes `features/<unit set>/site/` (rendered by `tools.html.site`) under its own lock: built in a
temporary folder and swapped in whole. The features stage and the describe stage run it when they
finish, so a site is there after each of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tools.core import guard
from tools.core.config import UserError, stage_main
from tools.core.layout import RunLayout
from tools.core.stage import Stage
from tools.features.config import FeaturesConfig, unit_name
from tools.features.records import FILE as FEATURES
from tools.html import site as render


class SiteStage(Stage):
    """`features/<unit set>/` + its description runs -> `features/<unit set>/site/`; the `features`
    section names the unit set. Current when `site/render.json` matches its inputs as they are now."""

    name, what, key, schema = "tools.site", "site", "features", FeaturesConfig

    @property
    def unit_set(self) -> str:
        return unit_name(self.cfg)

    def output_dir(self) -> Path:
        return RunLayout.of(self.cfg).site(self.unit_set)

    def done(self) -> bool:
        """Rendered from the features and description runs as they are now."""
        try:
            return render.is_current(RunLayout.of(self.cfg).run_dir, self.unit_set)
        except UserError:
            return False

    def verify_inputs(self) -> None:
        feats = RunLayout.of(self.cfg).features(self.unit_set)
        if not (feats / FEATURES).is_file():
            raise UserError(f"{feats / FEATURES} not found (run `python -m tools.top_activations` with the "
                            "same run_dir and features.* settings first)")

    def run(self) -> dict[str, Any]:
        self.verify_inputs()  # before the lock: a missing feature set leaves no folder behind
        return super().run()

    def work(self) -> dict[str, Any]:
        lay, name = RunLayout.of(self.cfg), self.unit_set
        guard.remove_stale_temps(lay.features(name), ".site.tmp-*")  # renders killed mid-way
        index = render.render_site(lay.run_dir, name)
        print(f"site: {name} -> {index}", flush=True)
        return {"name": name, "site": str(index)}


def done(cfg: DictConfig) -> bool:
    """Complete when the site was rendered from the features and description runs as they are now."""
    return SiteStage(cfg).done()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Render (or bring up to date) the unit set's site; returns its name and index.html."""
    return SiteStage(cfg).run()


main = stage_main(run)

if __name__ == "__main__":
    main()
