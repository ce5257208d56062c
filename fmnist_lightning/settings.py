"""From YAML files and command-line options to validated settings, and back to config.yaml.

`resolve_settings` layers defaults, a config file and the options given; `validated` turns a
pydantic error into the one line a user reads, naming the key, the rule (read from the field's
bounds) and where the value came from. This module imports neither torch nor lightning.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError

from fmnist_lightning.config import Settings, StrictModel
from fmnist_lightning.errors import UsageError

PROVENANCE_KEY = "provenance"  # versions, git commit and resolved hardware, in each run's config.yaml


# ---------------------------------------------------------------------------------------------
# Errors as one line


def _rule(info: Any, numeric: type) -> str | None:
    """The constraint of a field in words ('at least 1', 'in [0, 1)'), from its Field bounds."""
    bounds: dict[str, Any] = {}
    for m in info.metadata:
        for kind in (Ge, Gt, Le, Lt):
            if isinstance(m, kind):
                bounds[kind.__name__.lower()] = getattr(m, kind.__name__.lower())
    lo, hi = bounds.get("ge"), bounds.get("lt", bounds.get("le"))
    if "gt" in bounds and bounds["gt"] == 0 and hi is None:
        return "a positive integer" if numeric is int else "a positive number"
    if lo is not None and hi is None:
        return f"at least {lo}" if numeric is int else f">= {lo}"
    if lo is not None and "le" in bounds:
        return f"in {lo}..{hi}" if numeric is int else f"in [{lo}, {hi}]"
    if lo is not None and "lt" in bounds:
        return f"in [{lo}, {hi})"
    return None


def _choices(annotation: Any) -> tuple[str, ...]:
    """The allowed values of a Literal field, or of the items of a tuple of Literals."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) is tuple:
        return _choices(get_args(annotation)[0])
    return ()


def _numeric_type(annotation: Any) -> type:
    for kind in (int, float):
        if annotation is kind or kind in get_args(annotation):
            return kind
    return str


def describe_error(model: type[BaseModel], error: Any) -> str:
    """One pydantic error as the sentence a user reads: the key, what it must be, what it got."""
    name = str(error["loc"][0]) if error["loc"] else "settings"
    value, kind = error.get("input"), error["type"]
    fields = model.model_fields
    if kind == "extra_forbidden":
        return f"unknown setting {name!r}; known settings: {', '.join(fields)}"
    info = fields[name]
    if kind == "value_error":
        return f"{name} {error['ctx']['error']}"
    choices = _choices(info.annotation)
    if kind == "too_short":
        return f"{name} names none; choose from {', '.join(choices)}"
    if kind == "literal_error" or choices:
        return f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}"
    numeric = _numeric_type(info.annotation)
    rule = _rule(info, numeric)
    if kind.endswith(("_type", "_parsing")) or rule is None:
        args = get_args(info.annotation)
        if int in args and float in args:
            wanted = "number"
        else:
            wanted = info.annotation.__name__ if isinstance(info.annotation, type) else numeric.__name__
        return f"setting {name!r} must be of type {wanted}, got {value!r} ({type(value).__name__})"
    return f"{name} must be {rule}, got {value!r}"


def validated(model: type[StrictModel], values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Any:
    """`model(**values)`, or a one-line UsageError naming the key, the rule and where the value came from."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else ""
        message = describe_error(model, error)
        source = (sources or {}).get(key)
        if source and source.startswith("config file"):
            message = f"{source}: {message}"
        elif source:
            message = f"{message} (from {source})"
        raise UsageError(message) from None


# ---------------------------------------------------------------------------------------------
# YAML


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a settings YAML file into a dict keyed by setting name (dashes become underscores)."""
    import yaml

    if not path.exists():
        raise UsageError(f"config file {path} does not exist")
    if path.is_dir():
        raise UsageError(f"config file {path} is a folder; give a .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise UsageError(f"config file {path} is empty; put settings in it, e.g. 'max_epochs: 5'")
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of setting: value, not a {type(data).__name__}")
    # The provenance block is written by `fmnist fit` for the record; it is not a setting.
    return {str(k).replace("-", "_"): v for k, v in data.items() if k != PROVENANCE_KEY}


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def from_options(model: type[StrictModel], given: Mapping[str, Any]) -> Any:
    """A model from the command-line options that were given (the rest keep their defaults)."""
    return validated(model, given, {name: option_name(name) for name in given})


def resolve_settings(config: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then the YAML file, then explicit overrides (the CLI options that were given)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config is not None:
        values = load_yaml(config)
        sources = dict.fromkeys(values, f"config file {config}")
    for name, value in (overrides or {}).items():
        values[name] = value
        sources[name] = option_name(name)
    settings: Settings = validated(Settings, values, sources)
    return settings


def save_yaml(settings: Settings, path: Path, provenance: Mapping[str, Any] | None = None) -> None:
    """Write the resolved settings (and where they ran: versions, git commit, hardware) as YAML."""
    import yaml

    data = settings.model_dump()
    if provenance:
        data[PROVENANCE_KEY] = dict(provenance)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@functools.cache
def provenance() -> dict[str, Any]:
    """Versions and git commit, recorded in each run's config.yaml and checkpoints."""
    import platform
    import subprocess

    import lightning
    import torch

    from fmnist_lightning import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "fmnist_lightning": __version__,
        "torch": str(torch.__version__),
        "lightning": str(lightning.__version__),
        "python": platform.python_version(),
        "git_commit": commit or None,
    }
