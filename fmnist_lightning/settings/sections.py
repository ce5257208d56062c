"""Settings models with flat names: the machinery behind `models.py`.

A `FlatModel`'s field names are the names users see: YAML keys and `--options`. A `Sectioned` model
is composed of `Section`s (small strict pydantic models) instead: it is built from one flat mapping
of setting names (a YAML file, the command-line options given, a run's config.yaml), sorts each
name into its section, and dumps itself back to the flat mapping: the sections structure the code,
while users, YAML files and the CLI see flat names (`lr`, `--lr`). `flat_fields` lists every
setting with its section and field, for the CLI's options and the error messages. `arguments_for`
hands a section's settings to a constructor by their names.

This module imports neither torch nor lightning.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic.fields import FieldInfo
from typing_extensions import Self


def number_from_text(value: Any) -> Any:
    """'10' -> 10 and '1e-3' -> 0.001; anything else is left for the type check to judge."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


Number = BeforeValidator(number_from_text)


def comma_list(value: Any) -> Any:
    """'a,b' or ['a', 'b,c'] (an option given several times, or a YAML list) -> ('a', 'b', 'c')."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(part.strip() for v in value for part in v.split(",") if part.strip())
    return value


class StrictModel(BaseModel):
    """Unknown keys and wrong types are errors; a model is a value (frozen)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Section(StrictModel):
    """One group of settings. Its field names are the flat YAML keys and option names."""


def arguments_for(target: Callable[..., Any], *sections: Section) -> dict[str, Any]:
    """The fields of `sections` that name a parameter of `target`, as its keyword arguments: a
    setting reaches a constructor by its name alone, with no list of fields to keep in step."""
    parameters = set(inspect.signature(target).parameters)
    return {name: value for section in sections for name, value in section.model_dump(include=parameters).items()}


@dataclass(frozen=True)
class FlatField:
    """One setting as the CLI and YAML see it: its name, the section that declares it, its field."""

    name: str
    section: str | None  # None: a plain field of a flat model
    info: FieldInfo

    @property
    def default(self) -> Any:
        return self.info.default


class FlatModel(StrictModel):
    """Settings whose field names are the names users see (YAML keys, `--options`): what
    `cli_options.py` makes options of and `settings/files.py` validates. Its fields are plain
    (`BenchConfig`); `Sectioned` groups them in sections."""

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        return {}

    @classmethod
    def flat_fields(cls) -> dict[str, FlatField]:
        """Every setting by its flat name, in declaration order."""
        return {name: FlatField(name, None, info) for name, info in cls.model_fields.items()}

    def flat(self, json: bool = False) -> dict[str, Any]:
        """All settings as one flat mapping (as YAML and config.yaml hold them)."""
        return self.model_dump(mode="json" if json else "python")

    def replace(self, **changes: Any) -> Self:
        """A validated copy with these flat settings changed."""
        return self.model_validate({**self.flat(), **changes})


def _is_section(annotation: Any) -> TypeGuard[type[Section]]:
    return isinstance(annotation, type) and issubclass(annotation, Section)


class Sectioned(FlatModel):
    """Settings composed of sections, built from and dumped to one flat mapping of setting names.

    `Settings(lr=0.01)`, `Settings.model_validate({"lr": 0.01, "seed": 1})` and a nested
    `{"optimisation": {"lr": 0.01}}` all work; `flat()` gives the flat mapping back (config.yaml).
    Every field is a section, and a setting's name must belong to one section only.
    """

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        plain = [name for name, info in cls.model_fields.items() if not _is_section(info.annotation)]
        if plain:
            raise TypeError(f"{cls.__name__}: {', '.join(plain)} must be sections (a plain field: use FlatModel)")

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        return {name: info.annotation for name, info in cls.model_fields.items() if _is_section(info.annotation)}

    @classmethod
    def flat_fields(cls) -> dict[str, FlatField]:
        return {
            key: FlatField(key, name, info)
            for name, section in cls.sections().items()
            for key, info in section.model_fields.items()
        }

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """Flat keys -> their sections (on top of each section's defaults); unknown keys stay at
        the top, where `extra="forbid"` reports them by name."""
        if not isinstance(data, dict):
            return data
        owners = {name: f.section for name, f in cls.flat_fields().items()}
        nested: dict[str, Any] = {}
        given: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            section = owners.get(key)
            if section is None:
                nested[key] = value
            else:
                given.setdefault(section, {})[key] = value
        for section, values in given.items():
            base = nested.get(section, cls.model_fields[section].get_default(call_default_factory=True))
            if isinstance(base, BaseModel):
                base = dict(base)
            nested[section] = {**base, **values}
        return nested

    def flat(self, json: bool = False) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for section in self.model_dump(mode="json" if json else "python").values():
            flat.update(section)
        return flat
