"""Settings models made of sections, with flat names: the machinery behind `settings.py`.

A `Sectioned` model is composed of `Section`s (small strict pydantic models). It is built from one
flat mapping of setting names (a YAML file, the command-line options given, a run's config.yaml),
sorts each name into its section, and dumps itself back to the flat mapping: the sections structure
the code, while users, YAML files and the CLI see flat names (`lr`, `--lr`). `flat_fields` lists
every setting with its declaring model and default, for the CLI's options and the error messages.

This module imports neither torch nor lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class FlatField:
    """One setting as the CLI and YAML see it: its name, the model that declares it, its default."""

    name: str
    section: str | None  # None: a field of the composed model itself
    info: FieldInfo
    default: Any


class Sectioned(StrictModel):
    """Settings composed of sections, built from and dumped to one flat mapping of setting names.

    `Settings(lr=0.01)`, `Settings.model_validate({"lr": 0.01, "seed": 1})` and a nested
    `{"optimisation": {"lr": 0.01}}` all work; `flat()` gives the flat mapping back (config.yaml).
    A section's default may differ from its class's own defaults (`BenchConfig` benchmarks
    PyTorch's plain layout by default): `flat_fields` reports the composed model's defaults.
    """

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        return {
            name: info.annotation
            for name, info in cls.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, Section)
        }

    @classmethod
    def flat_fields(cls) -> dict[str, FlatField]:
        """Every setting by its flat name, in declaration order. A field of the composed model
        itself shadows a section's field of the same name (`BenchConfig.precision`, a list)."""
        own = {name: info for name, info in cls.model_fields.items() if name not in cls.sections()}
        fields: dict[str, FlatField] = {}
        for name, info in cls.model_fields.items():
            section = cls.sections().get(name)
            if section is None:
                fields[name] = FlatField(name, None, info, info.default)
                continue
            defaults = info.get_default(call_default_factory=True)
            for key, sub in section.model_fields.items():
                if key not in own:
                    fields[key] = FlatField(key, name, sub, getattr(defaults, key))
        return fields

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """Flat keys -> their sections (on top of each section's defaults); unknown keys stay at
        the top, where `extra="forbid"` reports them by name."""
        if not isinstance(data, dict):
            return data
        data = cls._prepare(data)
        owners = {name: f.section for name, f in cls.flat_fields().items() if f.section is not None}
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

    @classmethod
    def _prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A hook: the flat values before they are sorted into sections."""
        return data

    def flat(self, json: bool = False) -> dict[str, Any]:
        """All settings as one flat mapping (as YAML and config.yaml hold them)."""
        dump = self.model_dump(mode="json" if json else "python")
        flat: dict[str, Any] = {}
        for name, value in dump.items():
            flat.update(value if name in self.sections() else {name: value})
        return flat

    def replace(self, **changes: Any) -> Self:
        """A validated copy with these flat settings changed."""
        return self.model_validate({**self.flat(), **changes})
