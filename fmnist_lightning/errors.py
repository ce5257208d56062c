"""Errors a user can fix. The CLI prints their message as one line, with no traceback.

Library code raises these instead of printing or exiting, so tests (and other programs) can catch
them. `exit_code` follows the usual shell convention: 2 for a wrong command line, 1 for a failure
at run time (bad file, missing data, full disk).

A missing optional dependency (one of pyproject's extras) is such an error too: `require_extra`
names the command that needs it and the line that installs it,

    require_extra("tune", ("optuna",), "fmnist tune")
    -> MissingExtra: fmnist tune needs the 'tune' extra (optuna missing): pip install -e ".[tune]"

and uses only `importlib.util.find_spec`: nothing is imported, so a check costs no start-up time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence


class FmnistError(Exception):
    """A runtime problem the user can fix (exit code 1)."""

    exit_code = 1


class UsageError(FmnistError):
    """The command line or config asked for something impossible (exit code 2)."""

    exit_code = 2


class DataError(FmnistError):
    """The dataset is missing, truncated, corrupt or of the wrong kind."""


class CheckpointError(FmnistError):
    """A checkpoint is missing, unreadable or belongs to another model or program."""


class TrainingInterrupted(FmnistError):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""

    exit_code = 130


class NonFiniteLoss(FmnistError):
    """The training loss became NaN or infinite; training stopped before saving the broken weights."""


class MissingExtra(UsageError):
    """A command needs an optional dependency that is not installed (exit code 2)."""


def extra_hint(extra: str) -> str:
    """The command that installs an extra (the package is installed from its repository)."""
    return f'pip install -e ".[{extra}]"'


def missing_modules(names: Sequence[str]) -> list[str]:
    """Which of these top-level modules are not installed (none imported to find out)."""
    # A module set to None in sys.modules counts as missing: tests fake a missing extra that way.
    return [name for name in names if importlib.util.find_spec(name) is None]


def require_extra(extra: str, modules: Sequence[str], purpose: str) -> None:
    """Raise MissingExtra naming `purpose`, the extra, what is missing and how to install it."""
    if missing := missing_modules(modules):
        raise MissingExtra(f"{purpose} needs the '{extra}' extra ({', '.join(missing)} missing): {extra_hint(extra)}")
