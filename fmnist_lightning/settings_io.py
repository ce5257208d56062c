"""Settings in and out: YAML files and command-line options to validated settings, and back to config.yaml.

`resolve_settings` layers defaults, a config file and the options given; `validated` turns a
pydantic error into the one line a user reads, naming the key, the rule (read from the field's
bounds) and where the value came from; `read_config` is the one reader of a settings file or a
run's config.yaml. This module imports neither torch nor lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ValidationError

from fmnist_lightning.errors import UsageError
from fmnist_lightning.runs import CONFIG
from fmnist_lightning.sections import FlatModel
from fmnist_lightning.settings import Settings

PROVENANCE_KEY = "provenance"  # versions, git commit and resolved hardware, in each run's config.yaml
Model = TypeVar("Model", bound=FlatModel)


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


def describe_error(model: type[FlatModel], error: Any) -> str:
    """One pydantic error as the sentence a user reads: the key, what it must be, what it got."""
    loc = [str(part) for part in error["loc"]]
    # A section's field is reported by its own (flat) name: ("optimisation", "lr") -> "lr".
    name = loc[1] if len(loc) > 1 and loc[0] in model.sections() else (loc[0] if loc else "settings")
    value, kind = error.get("input"), error["type"]
    fields = model.flat_fields()
    if kind == "extra_forbidden":
        return f"unknown setting {name!r}; known settings: {', '.join(fields)}"
    info = fields[name].info
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


def validated(model: type[Model], values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Model:
    """`model(**values)` from flat values, or a one-line UsageError naming the key, the rule and
    where the value came from."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        key = loc[-1] if loc else ""
        message = describe_error(model, error)
        source = (sources or {}).get(key)
        if source and source.startswith("config file"):
            message = f"{source}: {message}"
        elif source:
            message = f"{message} (from {source})"
        raise UsageError(message) from None


# ---------------------------------------------------------------------------------------------
# YAML


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A settings file or a run's config.yaml: (settings by name, dashes as underscores; the
    provenance block `fmnist fit` records beside them, or {}). A UsageError says what is wrong."""
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
    provenance = data.get(PROVENANCE_KEY)
    values = {str(k).replace("-", "_"): v for k, v in data.items() if k != PROVENANCE_KEY}
    return values, provenance if isinstance(provenance, dict) else {}


def load_yaml(path: Path) -> dict[str, Any]:
    """The settings of a YAML file, by name (the provenance block is a record, not a setting)."""
    return read_config(path)[0]


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def from_options(model: type[Model], given: Mapping[str, Any]) -> Model:
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
    return validated(Settings, values, sources)


def fit_settings(config: Path | None, overrides: Mapping[str, Any], out: Path | None, resume: bool) -> Settings:
    """Settings for `fit`: on --resume the run's own config.yaml is the base, unless --config is given."""
    if resume and config is None and out is not None and (out / CONFIG).is_file():
        config = out / CONFIG
    return resolve_settings(config, overrides)


def save_yaml(settings: FlatModel, path: Path, provenance: Mapping[str, Any] | None = None) -> None:
    """Write the resolved settings, flat (and where they ran: versions, git commit, hardware) as YAML."""
    import yaml

    data = settings.flat()
    if provenance:
        data[PROVENANCE_KEY] = dict(provenance)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
