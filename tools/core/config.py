"""Hydra glue shared by every stage: typed config sections, one error type, one entry point.

Every stage module exposes `run(cfg) -> dict` (its summary figures) and `main = stage_main(run)`,
so `python -m <package>.<module> key=value ...` and `tools.pipeline` call the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
T = TypeVar("T")


class UserError(Exception):
    """Bad input or configuration: reported as one clear line and exit status 2, no traceback."""


def typed(node: Any, schema: type[T], where: str) -> T:
    """Validate a config section against a dataclass: unknown keys and wrong types name the key."""
    if dataclasses.is_dataclass(schema) and hasattr(node, "keys"):
        unknown = sorted(set(node.keys()) - {f.name for f in dataclasses.fields(schema)})
        if unknown:
            raise UserError(f"config `{where}`: unknown key `{where}.{unknown[0]}` "
                            f"(not a field of {schema.__name__})")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = getattr(e, "msg", str(e)).splitlines()[0]
        raise UserError(f"config `{where}`: {msg}" + (f" (key `{where}.{key}`)" if key else "")) from e


def section(cfg: Any, key: str, schema: type[T]) -> T:
    """The one way to read a config section: `cfg.<key>` typed as `schema`, then its own `.check()`.

    Unknown keys and wrong types name the key (`typed`); the dataclass's `check()` refuses values
    out of range, naming `<key>.<field>`. A missing section reads as the schema's defaults.
    """
    node = cfg.get(key) if hasattr(cfg, "get") else None
    obj = typed(node if node is not None else {}, schema, key)
    check = getattr(obj, "check", None)
    return check() if callable(check) else obj


NEUTRAL = "output_neutral"


def neutral(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field that is not hashed as it is: it changes how the output is made (logging,
    batching, a cache), not what it holds, or the stage hashes what it means in its own way."""
    return dataclasses.field(default=default, default_factory=factory, metadata={NEUTRAL: True})


def output_fields(obj: Any) -> dict[str, Any]:
    """`asdict(obj)` minus its `neutral` fields: the part of a config section that its output hash covers."""
    skip = {f.name for f in dataclasses.fields(obj) if f.metadata.get(NEUTRAL)}
    return {k: v for k, v in dataclasses.asdict(obj).items() if k not in skip}


def resolve_device(name: str) -> str:
    """`auto` means CUDA when present, else CPU."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


FULL_ERROR_ENV = "MONOSEMANTIC_FULL_ERROR"  # =1: full tracebacks instead of one-line errors


def full_errors() -> bool:
    return os.environ.get(FULL_ERROR_ENV, "") not in ("", "0")


def _quote_hint(override: str) -> str:
    key, eq, value = override.partition("=")
    if not eq:
        return "no `=`: a value with spaces was split into words by the shell; quote it: 'key=\"a b\"'"
    return f"quote the value for Hydra inside shell quotes: '{key}=\"{value}\"'"


def error_line(e: BaseException) -> str:
    """One line for an error a user can fix: a bad override, a config problem, a file system error."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OverrideParseException):
        why = str(e).splitlines()[0].strip() if str(e).strip() else "syntax error"
        return (f"cannot parse the override {e.override!r} ({why}); {_quote_hint(e.override)} "
                "(see README: paths with spaces or non-ASCII characters)")
    cause = e.__cause__
    if isinstance(e, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or getattr(cause, "key", None)
        first = str(e).splitlines()[0]
        unknown = isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or "not in struct" in str(cause)
        if key and unknown:
            return (f"unknown config key `{key}` ({first.rstrip('.')}); check its spelling "
                    f"(`--cfg job` prints every key) or write +{key}=... to add a new one")
        return f"{first} {str(cause).splitlines()[0]}" + (f" (key `{key}`)" if key else "")
    if isinstance(e, (ConfigCompositionException, MissingConfigException, OmegaConfBaseException)):
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if isinstance(e, MissingConfigException) and e.options:
            options = [o for o in e.options if o != "schema"]  # schema: the dataclass options extend
            return f"{lines[0]}; available: {', '.join(options)}"
        return lines[0] if lines else type(e).__name__
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        return (f"{e.strerror or e}:{where}; check that the path exists and is writable "
                "(e.g. choose another run_dir=...)")
    raise e


def _report(e: BaseException) -> None:
    try:
        line = error_line(e)
    except BaseException:
        raise e from None
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(2)


def stage_main(run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """Wrap a stage's `run(cfg)` as a Hydra app over conf/config.yaml with clean error exits.

    Bad overrides, config errors, `UserError` and file system errors print one line and exit 2;
    MONOSEMANTIC_FULL_ERROR=1 (or HYDRA_FULL_ERROR=1) gives the traceback instead. SIGTERM/SIGINT
    stop a long stage at its next resume point: one line, exit 128 + the signal (`tools.core.preempt`).
    """
    from tools.core import preempt

    @functools.wraps(run)
    def task(cfg: DictConfig) -> Any:
        try:
            with preempt.handlers():
                return run(cfg)
        except preempt.Preempted as e:
            print(e.line(), file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except Exception as e:  # reported here, or Hydra logs its own line first
            if full_errors():
                raise
            _report(e)

    def main() -> None:
        register_schemas()
        if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
            os.environ[FULL_ERROR_ENV] = "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; we print the one line
        try:
            hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(task)()
        except Exception as e:
            if full_errors():
                raise
            _report(e)

    return main


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The same config a stage sees from the command line, for tests and the pipeline."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


SCHEMAS = "conf.schema"  # imported by name: the schemas import this module


def register_schemas() -> None:
    """Store every section's dataclass in Hydra's ConfigStore as `<group>/schema` (conf/schema.py),
    which each group's YAML extends, so the dataclasses hold every default."""
    importlib.import_module(SCHEMAS).register()
