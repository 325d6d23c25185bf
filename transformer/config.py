"""Hydra glue shared by every stage: typed config sections, one error type, one entry point.

Every stage module exposes `run(cfg) -> dict` (its summary figures) and `main = stage_main(run)`,
so `python -m <package>.<module> key=value ...` and `tools.pipeline` call the same code.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
T = TypeVar("T")


class UserError(Exception):
    """Bad input or configuration: reported as one clear line and exit status 2, no traceback."""


def typed(node: Any, schema: type[T], where: str) -> T:
    """Validate a config section against a dataclass: unknown keys and wrong types name the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = getattr(e, "msg", str(e)).splitlines()[0]
        raise UserError(f"config `{where}`: {msg}" + (f" (key `{where}.{key}`)" if key else "")) from e


def resolve_device(name: str) -> str:
    """`auto` means CUDA when present, else CPU."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def stage_main(run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """Wrap a stage's `run(cfg)` as a Hydra app over conf/config.yaml with clean error exits."""

    @functools.wraps(run)
    def task(cfg: DictConfig) -> Any:
        try:
            return run(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    def main() -> None:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(task)()

    return main


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The same config a stage sees from the command line, for tests and the pipeline."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])
