"""nox sessions: `nox -s tests`, `nox -s lint`, `nox -s typecheck`.

Uses nox's default virtualenv backend with pip (pip finds this machine's local torch wheels;
uv and poetry would download several GB of CUDA wheels instead).
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]
PYPROJECT = nox.project.load_toml("pyproject.toml")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite on the real Fashion-MNIST (pass `-- -m "not slow"` to skip slow tests)."""
    session.install(
        "-e", ".[tensorboard,export,tracking,tune,serve]", *nox.project.dependency_groups(PYPROJECT, "test")
    )
    session.run("pytest", *session.posargs, env={"PYTHONUNBUFFERED": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("mypy", "fmnist_lightning")
