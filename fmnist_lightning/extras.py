"""The optional dependencies (pyproject's extras): whether one is installed, and the one-line error
that names the command installing it.

    require_extra("tune", ("optuna",), "fmnist tune")
    -> UsageError: fmnist tune needs the 'tune' extra (optuna missing): pip install -e ".[tune]"

Only `importlib.util.find_spec`: nothing is imported, so a check costs no start-up time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from fmnist_lightning.errors import UsageError


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
