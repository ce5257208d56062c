"""Search spaces for `fmnist tune`: a YAML file mapping setting names to distributions.

    lr: {low: 1e-4, high: 1e-2, log: true}   # a range: float, or int when the setting is an integer
    dropout_conv: {low: 0.0, high: 0.5}
    batch_size: {choices: [64, 128]}          # a list of values: any setting
    dropout: [true, false]                    # the same, written as a plain list

Every name, bound and choice is checked against the settings model (on top of the base settings)
before any trial runs, so a typo costs one line instead of a study of failed trials. A range is
checked at both bounds: the settings' constraints are intervals, so every value between passes too.

No optuna here: a `Param` asks any object with Optuna's `suggest_*` methods for its value.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmnist_lightning.errors import UsageError
from fmnist_lightning.settings import Settings, number_from_text, validated

RANGE_KEYS = ("low", "high", "log")
SCALARS = (bool, int, float, str, type(None))  # what Optuna can store as a categorical choice


@dataclass(frozen=True)
class Param:
    """One tuned setting: a range (`low`..`high`, on a log scale if `log`) or a list of `choices`."""

    name: str
    low: float | int = 0
    high: float | int = 0
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def load_space(path: Path, base: Settings) -> tuple[Param, ...]:
    """The parameters of a space file, each checked against the settings; a UsageError names the first problem."""
    import yaml

    if not path.is_file():
        raise UsageError(f"space file {path} does not exist or is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read space file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(
            f"space file {path} must map setting names to ranges or choices, "
            "e.g. 'lr: {low: 1e-4, high: 1e-2, log: true}' or 'batch_size: [64, 128]'"
        )
    try:
        return tuple(_param(str(name).replace("-", "_"), entry, base) for name, entry in data.items())
    except UsageError as exc:
        raise UsageError(f"space file {path}: {exc}") from None


def _param(name: str, entry: Any, base: Settings) -> Param:
    fields = Settings.flat_fields()
    if name not in fields:
        raise UsageError(f"unknown setting {name!r}; known settings: {', '.join(fields)}")
    if isinstance(entry, list):  # `batch_size: [64, 128]`: the natural way to write a choice
        entry = {"choices": entry}
    if not isinstance(entry, dict) or not entry:
        raise UsageError(
            f"{name}: give a range {{low: ..., high: ...}}, {{choices: [...]}} or a list [...], not {entry!r}"
        )
    if "choices" in entry:
        return _choices(name, entry, base)
    unknown = [k for k in entry if k not in RANGE_KEYS]
    if unknown or "low" not in entry or "high" not in entry:
        raise UsageError(f"{name}: a range needs low and high (and optionally log: true), got keys {list(entry)}")
    return _range(name, entry, base)


def _choices(name: str, entry: dict[str, Any], base: Settings) -> Param:
    choices = entry["choices"]
    if len(entry) > 1:
        raise UsageError(f"{name}: choices takes no other keys, got {list(entry)}")
    if not isinstance(choices, list) or not choices:
        raise UsageError(f"{name}: choices must be a non-empty list of values, got {choices!r}")
    for choice in choices:
        if not isinstance(choice, SCALARS):
            raise UsageError(f"{name}: each choice must be a single value, got {choice!r}")
        _check_value(name, choice, base)
    return Param(name, choices=tuple(choices))


def _range(name: str, entry: dict[str, Any], base: Settings) -> Param:
    annotation = Settings.flat_fields()[name].info.annotation
    kinds = typing.get_args(annotation) or (annotation,)
    if bool in kinds or not (int in kinds or float in kinds):
        kind = getattr(annotation, "__name__", str(annotation))
        raise UsageError(f"{name} is a {kind} setting, not a number: give choices: [...] instead of a range")
    low, high, log = number_from_text(entry["low"]), number_from_text(entry["high"]), entry.get("log", False)
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{name}: {bound} must be a number, got {value!r}")
    both_int = isinstance(low, int) and isinstance(high, int)
    integer = int in kinds and (float not in kinds or both_int)  # Lightning's limits: counts or fractions
    if integer and not both_int:
        raise UsageError(f"{name} takes integers: the range's bounds must be integers, got low {low!r}, high {high!r}")
    if not integer:
        low, high = float(low), float(high)
    if not isinstance(log, bool):
        raise UsageError(f"{name}: log must be true or false, got {log!r}")
    if low >= high:
        raise UsageError(f"{name}: empty range: low {low} must be below high {high}")
    if log and low <= 0:
        raise UsageError(f"{name}: a log range needs low > 0, got {low}")
    for value in (low, high):
        _check_value(name, value, base)
    return Param(name, low=low, high=high, log=log, integer=integer)


def _check_value(name: str, value: Any, base: Settings) -> None:
    """The settings the value would give must be valid (the message names the rule it breaks)."""
    with_value(base, {name: value})


def with_value(base: Settings, params: dict[str, Any]) -> Settings:
    """The base settings with these parameters set, validated."""
    return validated(Settings, {**base.flat(), **params})
