"""Settings in and out: YAML files and command-line options to validated settings, and back to config.yaml.

`resolve_settings` layers defaults, a config file and the options given; `validated` turns a
pydantic error into the one line a user reads, naming the key, the rule (pydantic's own words for
it) and where the value came from; `read_config` is the one reader of a settings file or a
run's config.yaml. This module imports neither torch nor lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import ValidationError

from fmnist_lightning.errors import UsageError
from fmnist_lightning.runs import CONFIG
from fmnist_lightning.settings.models import Settings
from fmnist_lightning.settings.sections import FlatModel

PROVENANCE_KEY = "provenance"  # versions, git commit and resolved hardware, in each run's config.yaml
Model = TypeVar("Model", bound=FlatModel)


# ---------------------------------------------------------------------------------------------
# Errors as one line


def _item_choices(annotation: Any) -> tuple[str, ...]:
    """The allowed items of a tuple of Literals (`logger`, `paths`), or ()."""
    if get_origin(annotation) is tuple and get_origin(item := get_args(annotation)[0]) is Literal:
        return get_args(item)
    return ()


def _flat_name(model: type[FlatModel], loc: tuple[Any, ...]) -> tuple[str, int]:
    """The flat name an error's location points at, and how many parts of the location that takes:
    a section's field is reported by its own name, ("optimisation", "lr") -> "lr"."""
    if len(loc) > 1 and loc[0] in model.sections():
        return str(loc[1]), 2
    return (str(loc[0]), 1) if loc else ("settings", 0)


def describe_error(model: type[FlatModel], errors: list[Any]) -> tuple[str, str]:
    """The first of pydantic's errors as (the flat name, the sentence a user reads): the name,
    the rule in pydantic's own words (`error["msg"]`; validators word theirs alike), so every
    constraint, including ones added later, is described by what it checks, and the value it checked."""
    first = errors[0]
    name, depth = _flat_name(model, first["loc"])
    fields = model.flat_fields()
    if first["type"] == "extra_forbidden":
        return name, f"unknown setting {name!r}; known settings: {', '.join(fields)}"
    field_loc = first["loc"][:depth]
    if len(first["loc"]) > depth and isinstance(first["loc"][depth], str):
        # A union (`int | float`) reports one error per member type, tagged by its name: all apply.
        rule = " or ".join(dict.fromkeys(e["msg"] for e in errors if e["loc"][:depth] == field_loc))
    else:
        rule = first["msg"]
    if first["type"] == "too_short" and (choices := _item_choices(fields[name].info.annotation)):
        rule += f" (choose from {', '.join(choices)})"
    return name, f"{name}: {rule}, got {first.get('input')!r}"


def validated(model: type[Model], values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Model:
    """`model(**values)` from flat values, or a one-line UsageError naming the key, the rule and
    where the value came from."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        name, message = describe_error(model, exc.errors())
        source = (sources or {}).get(name)
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


def fit_settings(
    config: Path | None, overrides: Mapping[str, Any], out: Path | None, resume: bool, test: bool = False
) -> Settings:
    """Settings for `fit`: on --resume the run's own config.yaml is the base, unless --config is given;
    `test` (fit --test) asks for a test after training, which --fast-dev-run has no checkpoint for."""
    if resume and config is None and out is not None and (out / CONFIG).is_file():
        config = out / CONFIG
    settings = resolve_settings(config, overrides)
    if test and settings.run.fast_dev_run:
        raise UsageError("--fast-dev-run already tests one batch and keeps no checkpoint; drop --test")
    return settings


def save_yaml(settings: FlatModel, path: Path, provenance: Mapping[str, Any] | None = None) -> None:
    """Write the resolved settings, flat (and where they ran: versions, git commit, hardware) as YAML."""
    import yaml

    data = settings.flat()
    if provenance:
        data[PROVENANCE_KEY] = dict(provenance)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
