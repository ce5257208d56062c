"""CLI options generated from the settings models, so YAML keys, options and config.yaml agree.

`with_options(Settings)` adds every setting of a model (or `with_options(EvaluationRun)` the
sections of evaluation; `names` picks some) to a Typer command as options: the field's type
(Literal choices, `--x/--no-x` for booleans, comma lists, Lightning's count-or-fraction
limits as text), its default and its description as help. An option counts as given when Click
says it came from the command line (`ctx.get_parameter_source`); only those override a config file.
`WholeSummariesGroup` lists the commands in the root help with their first sentences whole.
"""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperGroup

from fmnist_lightning.settings import FlatField, FlatModel, option_name

if TYPE_CHECKING:
    from typer._click import Context, HelpFormatter  # Typer's own copy of Click, which TyperGroup extends


def _option(field: FlatField) -> inspect.Parameter:
    """A keyword parameter whose default is the typer.Option for one setting."""
    name, info = field.name, field.info
    kind: Any = info.annotation
    args = typing.get_args(kind)
    decls = [option_name(name)]
    default, metavar = field.default, None
    if kind is bool:
        decls = [f"{option_name(name)}/--no-{option_name(name)[2:]}"]
    elif typing.get_origin(kind) is tuple:  # repeated, or a comma-separated list, on the command line
        kind, default, metavar = list[str], list(default), "<text>"
    elif int in args and float in args:  # Lightning's limits: "10" is a count, "0.5" a fraction
        kind, default = str, str(default)
    elif type(None) in args:  # `int | None`: not set unless given
        kind = Optional[next(a for a in args if a is not type(None))]
    option = typer.Option(
        default, *decls, help=info.description, show_default=default is not None or "not set", metavar=metavar
    )
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def with_options(
    model: type[FlatModel], names: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the settings of `model` (all, or the named ones, less `exclude`) as options. The command
    receives the ones given on the command line as a dict, `given`; its own parameters are left
    as they are."""
    fields = model.flat_fields()
    names = [n for n in (fields if names is None else names) if n not in set(exclude)]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)  # resolved, keeping Annotated options
        own = [
            p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values() if p.name != "given"
        ]
        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)

        @functools.wraps(fn)
        def command(ctx: typer.Context, **kwargs: Any) -> Any:
            given = {n: kwargs[n] for n in names if _from_command_line(ctx, n)}
            for n in names:
                kwargs.pop(n, None)
            return fn(given=given, **kwargs)

        params = [context, *own, *(_option(fields[n]) for n in names)]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


class WholeSummariesGroup(TyperGroup):
    """The root help's command list with each command's whole first sentence, wrapped (Click's
    plain help cuts it with "..." to fit one line)."""

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        commands = ((name, self.get_command(ctx, name)) for name in self.list_commands(ctx))
        rows = [(name, cmd.get_short_help_str(limit=sys.maxsize)) for name, cmd in commands if cmd and not cmd.hidden]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
