"""Every setting's rule is worded as the rule it is: for each field of each settings model, a value
that breaks each of its constraints (read from the field itself: its bounds, choices, lengths,
validators) and a value of the wrong type must give one error line that names the setting, says
the rule it broke (pydantic's own words for it) and where the value came from: an option of the
real command, a YAML config, or the flat values every command validates.

A constraint of a kind this file does not know, a validated field missing from VALIDATED, or a
field without constraints missing from UNCONSTRAINED fails the collection-time checks below, so a
new rule cannot slip by untested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from fmnist_lightning.errors import UsageError
from fmnist_lightning.settings import (
    BenchConfig,
    EvaluationRun,
    Sectioned,
    ServeRun,
    Settings,
    comma_list,
    number_from_text,
    validated,
)

# Each model, and the command whose options are made from it.
COMMANDS: dict[type[Sectioned], str] = {Settings: "fit", EvaluationRun: "test", ServeRun: "serve", BenchConfig: "bench"}

# Fields whose only rule is their type (checked by the wrong-type case alone).
UNCONSTRAINED = {
    *("dropout", "standardize", "channels_last", "compile", "offline", "augment", "deterministic", "progress"),
    *("fast_dev_run", "tta", "invert", "quick"),
    *("data_dir", "tracking_uri", "api_key"),
}

# Fields with validators of their own: a value each refuses, and the words of the rule it breaks.
VALIDATED = {
    "devices": ("0", "'auto', a count >= 1 or a list like '0,1'"),
    "limit_train_batches": ("0", "a fraction in (0, 1] or a count >= 1"),
    "limit_val_batches": ("1.5", "a fraction in (0, 1] or a count >= 1"),
    "val_check_interval": ("-2", "a fraction in (0, 1] or a count >= 1"),
    "overfit_batches": ("-1", "0 (off), a fraction in (0, 1] or a count >= 1"),
}
CONVERSIONS = (number_from_text, comma_list)  # before-validators that only convert text
BOUNDS = {Gt: "greater than", Ge: "greater than or equal to", Lt: "less than", Le: "less than or equal to"}
NOT_A_VALUE = {"not": "a value"}  # a mapping: the wrong type for every setting


@dataclass(frozen=True)
class Violation:
    model: type[Sectioned]
    name: str
    kind: str  # what it breaks: "lt", "choices", "finite", "type", ...
    value: Any
    words: tuple[str, ...]  # what the error must say of the rule, derived from the field, not from pydantic

    @property
    def id(self) -> str:
        return f"{self.model.__name__}-{self.name}-{self.kind}"


def _number(bound: Any) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _kinds(annotation: Any) -> tuple[Any, ...]:
    return tuple(a for a in (get_args(annotation) or (annotation,)) if a is not type(None))


def _validated_fields(model: type[Sectioned]) -> set[str]:
    """The fields of the model and its sections that a field validator, or a validator in the
    field's own metadata other than a conversion, checks."""
    names: set[str] = set()
    for owner in (model, *model.sections().values()):
        for decorator in owner.__pydantic_decorators__.field_validators.values():
            names.update(decorator.info.fields)
    for name, field in model.flat_fields().items():
        if any(hasattr(m, "func") and m.func not in CONVERSIONS for m in field.info.metadata):
            names.add(name)
    return names


def _constraint_violations(model: type[Sectioned], name: str, info: FieldInfo) -> list[Violation]:
    """One value per constraint of the field, read from its annotation and metadata."""
    found = []
    integer = int in _kinds(info.annotation) and float not in _kinds(info.annotation)
    for item in info.metadata:
        if hasattr(item, "func") and item.func in CONVERSIONS:
            continue
        if type(item) in BOUNDS:
            key = type(item).__name__.lower()
            bound = getattr(item, key)
            step = {"gt": 0, "lt": 0, "ge": -1, "le": 1}[key] * (1 if integer else 0.5)
            found.append(Violation(model, name, key, bound + step, (f"{BOUNDS[type(item)]} {_number(bound)}",)))
        elif type(item).__name__ == "AllowInfNan" and not item.allow_inf_nan:
            found.append(Violation(model, name, "finite", math.nan, ("finite number",)))
        elif isinstance(item, MinLen) and item.min_length == 1:
            tuple_field = get_origin(info.annotation) is tuple
            value, unit = (",", "item") if tuple_field else ("", "character")
            found.append(Violation(model, name, "empty", value, (f"at least 1 {unit}",)))
        elif name not in VALIDATED:
            raise AssertionError(f"{model.__name__}.{name}: a constraint this test cannot break yet: {item!r}")
    literal = info.annotation
    if get_origin(literal) is tuple:
        literal = get_args(literal)[0]
    if get_origin(literal) is Literal:
        choices = tuple(f"'{choice}'" for choice in get_args(literal))
        found.append(Violation(model, name, "choices", "not-a-choice", choices))
    if name in VALIDATED:
        value, words = VALIDATED[name]
        found.append(Violation(model, name, "validator", value, (words,)))
    return found


def _type_words(annotation: Any) -> tuple[str, ...]:
    """What pydantic calls a value of this type: the wrong-type case must say it."""
    words = {bool: "valid boolean", str: "valid string", int: "valid integer", float: "valid number"}
    if get_origin(annotation) is tuple:
        return ("valid tuple",)
    if get_origin(annotation) is Literal:
        return tuple(f"'{choice}'" for choice in get_args(annotation))
    return tuple(words[kind] for kind in _kinds(annotation))


def violations() -> list[Violation]:
    found = []
    for model in COMMANDS:
        fields = model.flat_fields()
        assert _validated_fields(model) <= set(VALIDATED), f"{model.__name__}: add these validators to VALIDATED"
        for name, field in fields.items():
            broken = _constraint_violations(model, name, field.info)
            assert bool(broken) != (name in UNCONSTRAINED), f"{model.__name__}.{name}: constrained or in UNCONSTRAINED"
            found += broken
            found.append(Violation(model, name, "type", NOT_A_VALUE, _type_words(field.info.annotation)))
    return found


VIOLATIONS = violations()


def _pydantic_message(violation: Violation) -> str:
    """What pydantic itself says of the value (the first error of the field)."""
    with pytest.raises(ValidationError) as caught:
        violation.model.model_validate({violation.name: violation.value})
    return caught.value.errors()[0]["msg"]


def _assert_names_the_rule(line: str, violation: Violation, source: str) -> None:
    assert f"{violation.name}: " in line, line
    assert _pydantic_message(violation) in line, line
    assert all(word in line for word in violation.words), (line, violation.words)
    assert source in line, (line, source)
    assert "must be of type" not in line and "\n" not in line.strip()


def test_every_kind_of_violation_is_covered() -> None:
    kinds = {v.kind for v in VIOLATIONS}
    assert kinds == {"gt", "ge", "lt", "le", "finite", "empty", "choices", "validator", "type"}
    assert {v.name for v in VIOLATIONS if v.kind == "validator"} == set(VALIDATED)


@pytest.mark.parametrize("violation", VIOLATIONS, ids=[v.id for v in VIOLATIONS])
def test_the_flat_values_every_command_validates(violation: Violation) -> None:
    """The one place all settings are checked: each value, given as an option or from a config file."""
    for source in ("--option", "config file c.yaml"):
        with pytest.raises(UsageError) as caught:
            validated(violation.model, {violation.name: violation.value}, {violation.name: source})
        _assert_names_the_rule(str(caught.value), violation, source)


def _options(command: str) -> set[str]:
    import typer.main

    from fmnist_lightning.cli import app

    return {p.name for p in typer.main.get_command(app).commands[command].params if p.name}  # type: ignore[attr-defined]


ON_THE_COMMAND_LINE = [
    v for v in VIOLATIONS if v.kind != "type" and v.name in _options(COMMANDS[v.model]) and v.value != NOT_A_VALUE
]


@pytest.fixture
def refuse_to_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Arguments and a guard so that a command whose settings were (wrongly) accepted fails at once
    instead of training, benchmarking or serving: every command imports lightning only after its
    settings are valid, and `test` and `serve` get a checkpoint that is not there."""

    def accepted() -> None:
        raise AssertionError("the settings were accepted")

    monkeypatch.setattr("fmnist_lightning.cli_options.quiet_lightning", accepted)
    monkeypatch.chdir(tmp_path)
    return ["--ckpt", str(tmp_path / "not-there.ckpt")]


@pytest.mark.parametrize("violation", ON_THE_COMMAND_LINE, ids=[v.id for v in ON_THE_COMMAND_LINE])
def test_each_option_of_each_command(violation: Violation, cli, refuse_to_run: list[str]) -> None:
    command = COMMANDS[violation.model]
    option = "--" + violation.name.replace("_", "-")
    ckpt = refuse_to_run if command in ("test", "serve") else []
    code, _, err = cli(command, *ckpt, f"{option}={violation.value}")
    line = err.strip()
    assert code == 2 and len(line.splitlines()) == 1 and line.startswith("error: "), err
    if line.startswith(f"error: Invalid value for '{option}'"):  # the command line's parser knows the choices
        assert violation.kind == "choices" and all(word in line for word in violation.words), line
    else:
        _assert_names_the_rule(line, violation, f"(from {option})")


IN_A_CONFIG = [v for v in VIOLATIONS if v.model is Settings]


@pytest.mark.parametrize("violation", IN_A_CONFIG, ids=[v.id for v in IN_A_CONFIG])
def test_each_key_of_a_fit_config(violation: Violation, cli, refuse_to_run: list[str], tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({violation.name: violation.value}))
    code, _, err = cli("fit", "--config", config, "--out", tmp_path / "run")
    line = err.strip()
    assert code == 2 and len(line.splitlines()) == 1 and line.startswith(f"error: config file {config}: "), err
    _assert_names_the_rule(line, violation, f"config file {config}")
    assert not (tmp_path / "run").exists()


def test_ema_decay_above_one_says_the_bound(cli, refuse_to_run: list[str]) -> None:
    """The report that started this file: the type was right, the bound was broken."""
    code, _, err = cli("fit", "--ema-decay", "1.5")
    assert code == 2 and err.strip() == "error: ema_decay: Input should be less than 1, got 1.5 (from --ema-decay)"


def test_a_union_names_every_type_it_takes(cli, refuse_to_run: list[str]) -> None:
    code, _, err = cli("fit", "--limit-train-batches", "many")
    expected = "limit_train_batches: Input should be a valid integer or Input should be a valid number, got 'many'"
    assert code == 2 and err.strip() == f"error: {expected} (from --limit-train-batches)", err


def test_a_list_item_and_an_empty_list_name_the_choices(cli, refuse_to_run: list[str]) -> None:
    code, _, err = cli("fit", "--logger", "csv,mlfow")
    expected = "logger: Input should be 'csv', 'tensorboard' or 'mlflow', got 'mlfow' (from --logger)"
    assert code == 2 and err.strip() == f"error: {expected}", err
    code, _, err = cli("fit", "--logger", ",")
    assert code == 2 and "(choose from csv, tensorboard, mlflow)" in err, err


def test_nested_input_is_named_by_its_flat_name() -> None:
    """A section given whole (`{"optimisation": {...}}`) is reported by the setting's own name."""
    with pytest.raises(UsageError, match=r"^lr: Input should be greater than 0, got -1 \(from --lr\)$"):
        validated(Settings, {"optimisation": {"lr": -1}}, {"lr": "--lr"})
