"""What every `fmnist` command shares, so that each command's body only calls the library and renders.

`@command(Settings)` adds every setting of a model to a Typer command as options (or
`@command(EvaluationRun, names)` some of them): the field's type (Literal choices, `--x/--no-x` for
booleans, comma lists, Lightning's count-or-fraction limits as text), its default and its
description as help. An option counts as given when Click says it came from the command line
(`ctx.get_parameter_source`); only those override a config file. Around the body, the decorator
validates the options given into the model (over `--config` where the command has it), quiets
Lightning, and turns an `FmnistError` into its one line (and Ctrl-C into "interrupted").
`--debug` (the root command's) lives in the Click context's `meta`, shared by every command.
`WholeSummariesGroup` lists the commands in the root help with their first sentences whole.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import traceback
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from typer._click.exceptions import NoArgsIsHelpError  # Typer's own copy of Click does not export it
from typer.core import TyperGroup

from fmnist_lightning import __version__, render
from fmnist_lightning.errors import FmnistError, TrainingInterrupted
from fmnist_lightning.hardware import is_global_zero
from fmnist_lightning.runs import newest_best_checkpoint
from fmnist_lightning.settings import FlatField, FlatModel, from_options, option_name, resolve_settings

if TYPE_CHECKING:
    from typer._click import Context, HelpFormatter  # Typer's own copy of Click, which TyperGroup extends

DEBUG = "fmnist.debug"  # key in the Click context's meta: --debug on the root command
Resolve = Callable[[dict[str, Any], dict[str, Any]], FlatModel]  # (options given, own parameters) -> settings

# Options that several commands have, beside their settings:
OutOption = Annotated[
    Optional[Path], typer.Option("--out", help="Output folder. Default: the checkpoint's run folder.")
]
CkptOption = Annotated[Path, typer.Option("--ckpt", help="Checkpoint file, e.g. runs/001/checkpoints/best.ckpt.")]
NewestCkptOption = Annotated[
    Optional[Path],
    typer.Option("--ckpt", help="Checkpoint file. Default: the newest run's best.ckpt in runs/.", show_default=False),
]
ConfigOption = Annotated[Optional[Path], typer.Option(help="YAML file of settings (keys = option names).")]


# ---------------------------------------------------------------------------------------------
# Errors as one line, Lightning quiet


def run_app(app: typer.Typer, args: list[str] | None) -> NoReturn:
    """Run `fmnist`: command-line usage errors also become one line (exit 2) instead of a panel."""
    try:
        result = app(args=args, standalone_mode=False, prog_name="fmnist")
    except typer.Abort:
        sys.exit(130)
    except NoArgsIsHelpError as exc:  # a bare `fmnist`: the "error" is the help
        typer.echo(exc.format_message())
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Typer's (click's) usage errors carry `format_message` and `exit_code`; anything else is a bug.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        render.problem("error", exc.format_message())
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else 0)


@contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Turn FmnistError into one red line on stderr and its exit code (a traceback with --debug)."""
    try:
        yield
    except FmnistError as exc:
        if debug:
            raise
        if is_global_zero():  # under DDP every process fails alike; one message is enough
            render.problem("interrupted" if isinstance(exc, TrainingInterrupted) else "error", str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _stopped_by_ctrl_c(debug)
    except SystemExit as exc:
        # Lightning turns a KeyboardInterrupt inside a Trainer call (data setup before training,
        # `trainer.test`) into exit(1); it is still the user's Ctrl-C.
        if isinstance(exc.__context__, KeyboardInterrupt):
            _stopped_by_ctrl_c(debug)
        raise


def _stopped_by_ctrl_c(debug: bool) -> NoReturn:
    """Ctrl-C outside the training loop (inside it, training saves a checkpoint and raises
    TrainingInterrupted). A fit that had not started has already removed its run folder."""
    if debug:
        traceback.print_exc()
    if is_global_zero():
        render.problem("interrupted", "stopped by Ctrl-C")
    raise typer.Exit(TrainingInterrupted.exit_code)


def lightning_logging_once() -> None:
    """Import lightning and leave its messages to our (the root logger's) handler alone.

    Lightning sets its loggers to INFO when imported, so this must run after the import. Its
    package logger also brings a console handler of its own: its messages would be printed
    twice, by that handler and by ours.
    """
    import lightning  # noqa: F401

    logging.getLogger("lightning").handlers.clear()


def quiet_lightning() -> None:
    """Import lightning, then hide its start-up chatter (GPU available, tips); --debug skips this.
    Called by each command once its settings are valid."""
    lightning_logging_once()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A torch/Lightning version mismatch warning that tells a user nothing actionable.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if "SLURM_JOB_ID" not in os.environ:
        # Lightning's "srun is available but not used" hint can only help inside a SLURM
        # allocation; on a login node or a workstation with SLURM installed it is noise.
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system")


def print_version(value: bool) -> None:
    """--version: print it and exit."""
    if value:
        render.console.print(f"fmnist-lightning {__version__}")
        raise typer.Exit()


def given_or_newest(ckpt: Path | None) -> Path:
    """--ckpt, or the newest run's best checkpoint (said so)."""
    if ckpt is not None:
        return ckpt
    newest = newest_best_checkpoint()
    render.using_checkpoint(newest)
    return newest


# ---------------------------------------------------------------------------------------------
# Options from the settings models, and the command decorator


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


def _layered(model: type[FlatModel], given: dict[str, Any], params: Mapping[str, Any]) -> FlatModel:
    """The settings from the options given; over `--config` when the command has that option."""
    return resolve_settings(params["config"], given) if "config" in params else from_options(model, given)


def command(
    model: type[FlatModel],
    names: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    resolve: Resolve | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A Typer command with the settings of `model` (all, or the named ones, less `exclude`) as options.

    The body takes `settings` (validated), its own parameters as Typer declares them, and, if it
    names it, `given` (the settings given on the command line, by name). Settings come from
    `resolve(given, own parameters)`, by default the options given over the `--config` file where
    the body has a `config` parameter. Validation runs before Lightning is imported; errors become
    one line."""
    fields = model.flat_fields()
    names = [n for n in (fields if names is None else names) if n not in set(exclude)]

    def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(body, include_extras=True)  # resolved, keeping Annotated options
        signature = inspect.signature(body).parameters
        own = [p.replace(annotation=hints[p.name]) for p in signature.values() if p.name not in ("settings", "given")]
        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)

        @functools.wraps(body)
        def run(ctx: typer.Context, **params: Any) -> Any:
            given = {n: params[n] for n in names if _from_command_line(ctx, n)}
            for n in names:
                params.pop(n, None)
            debug = bool(ctx.meta.get(DEBUG))
            with user_errors(debug):
                settings = (resolve or functools.partial(_layered, model))(given, params)
                if debug:
                    lightning_logging_once()
                else:
                    quiet_lightning()
                return body(settings=settings, **({"given": given} if "given" in signature else {}), **params)

        typer_params = [context, *own, *(_option(fields[n]) for n in names)]
        run.__signature__ = inspect.Signature(typer_params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in typer_params}
        return run

    return decorate


class WholeSummariesGroup(TyperGroup):
    """The root help's command list with each command's whole first sentence, wrapped (Click's
    plain help cuts it with "..." to fit one line)."""

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        commands = ((name, self.get_command(ctx, name)) for name in self.list_commands(ctx))
        rows = [(name, cmd.get_short_help_str(limit=sys.maxsize)) for name, cmd in commands if cmd and not cmd.hidden]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
