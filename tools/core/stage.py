"""The skeleton every stage shares: lock -> guard -> work -> seal, and one name for its hash.

A stage is a subclass of `Stage` that names its config section, its output folder, its finished
marker and sealed files, and implements `work()`:

    class TokensStage(Stage):
        name, what, key, schema = "transformer.prepare", "token directory", "data", DataConfig
        marker = "meta.json"

        def output_dir(self): ...
        def output_hash(self): return config_hash(...)   # what the output depends on
        def work(self): ...                              # writes the output, returns summary figures

`run()` takes the folder's lock (`tools.core.guard.output_lock`), checks the inputs (`verify_inputs`),
applies the overwrite rule (`guard.prepare_output`: a finished output made under another
`output_hash()` is replaced only with overwrite=true), calls `work()`, and seals `sealed` files in
`checksums.json` with the sha256 of `inputs()` (a stage that seals no files writes none), releases the
lock and calls `after()` (the site stage follows the features and describe stages there). `done()`
says whether the finished output is current. A stage that writes nothing (`writes = False`, a check)
runs `work()` alone and is never done. Each stage module keeps `run(cfg)`, `done(cfg)` and `main` as
one-line wrappers over its class.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig

from tools.core import guard
from tools.core.config import section
from tools.core.files import read_json


class Stage:
    """One stage over one composed config `cfg`; subclasses fill in the class attributes and `work()`."""

    name: ClassVar[str] = ""  # its module (`python -m <name>`), recorded as the lock's holder
    what: ClassVar[str] = "output"  # the output in messages ("SAE", "feature set")
    key: ClassVar[str] = ""  # its config section (`cfg.<key>`)
    schema: ClassVar[type | None] = None  # that section's dataclass
    marker: ClassVar[str] = ""  # the file (in output_dir) that marks the output finished
    sealed: ClassVar[tuple[str, ...]] = ()  # files whose sha256 goes into checksums.json
    verified: ClassVar[tuple[str, ...] | None] = None  # sealed files checked before a rerun; None = all
    rename_key: ClassVar[str | None] = None  # the key that writes the output under another name
    writes: ClassVar[bool] = True  # False: a check that writes nothing (no lock, no seal, never done)

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @functools.cached_property
    def c(self) -> Any:
        """The checked config section (`tools.core.config.section`)."""
        return section(self.cfg, self.key, self.schema) if self.schema is not None else None

    # ---- what a stage says about itself --------------------------------------------------------
    def output_dir(self) -> Path:
        raise NotImplementedError

    def output_hash(self) -> str | None:
        """The hash of everything the output depends on (config fields, inputs, seed)."""
        return None

    def recorded_hash(self) -> str | None:
        """The hash the finished output recorded (the marker's `config_hash` by default)."""
        path = self.output_dir() / self.marker
        return read_json(path).get("config_hash") if self.marker and path.is_file() else None

    def inputs(self) -> dict[str, str | os.PathLike] | None:
        """{role: path} whose sha256 `seal` records (None: keep what is recorded)."""
        return None

    def verify_inputs(self) -> None:
        """Refuse inputs that are corrupt or stale (sealed checksums, provenance)."""

    def overwrite(self) -> bool:
        return bool(self.cfg.get("overwrite", False))

    def done(self) -> bool:
        """Whether the finished output is current for this config and inputs."""
        if not self.writes:
            return False
        return self.recorded_hash() is not None and self.recorded_hash() == self.output_hash()

    def work(self) -> dict[str, Any]:
        raise NotImplementedError

    def finished(self, result: dict[str, Any]) -> bool:
        """Whether `work()` finished the output (a halted run is not sealed)."""
        return True

    def after(self, result: dict[str, Any]) -> dict[str, Any]:
        """What follows once the lock is released (another stage over this output); returns the figures."""
        return result

    # ---- the skeleton --------------------------------------------------------------------------
    def guard(self) -> None:
        """Intact inputs, and the overwrite rule for a finished output."""
        self.verify_inputs()
        if self.marker and (self.output_dir() / self.marker).is_file():
            checked = self.sealed if self.verified is None else self.verified
            guard.prepare_output(self.output_dir(), self.what, marker=self.marker, sealed=checked,
                                 old=self.recorded_hash(), new=self.output_hash(),
                                 overwrite=self.overwrite(), rename_key=self.rename_key)

    def seal(self) -> None:
        folder = self.output_dir()
        guard.seal(folder, [n for n in self.sealed if (folder / n).is_file()], inputs=self.inputs())

    def run(self) -> dict[str, Any]:
        """lock -> guard -> work -> seal, then `after()`; returns the summary figures."""
        if not self.writes:
            return self.work()
        with guard.output_lock(self.output_dir(), self.name):
            self.guard()
            result = self.work()
            if self.sealed and self.finished(result) and int(os.environ.get("RANK", "0")) == 0:
                self.seal()
        return self.after(result)
