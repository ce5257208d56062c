"""nox sessions: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, and `nox -s anchor` (the Keras anchor's
own environment, see scripts/keras_anchor.py).

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


# The Keras anchor's versions (issue 29 compared against these), pinned so that its figures stay comparable.
ANCHOR_PACKAGES = ("tensorflow-cpu==2.21.0", "keras==3.15.1")


@nox.session
def anchor(session: nox.Session) -> None:
    """The Keras anchor's environment (.nox/anchor: TensorFlow and Keras, never a dependency of the tool).

    `nox -s anchor --install-only` only builds it (CI does); `nox -s anchor -- ARGS` runs
    scripts/keras_anchor.py with ARGS in it (default: a tiny run)."""
    session.install(*ANCHOR_PACKAGES)
    tiny = ["--epochs", "1", "--limit-steps", "20", "--eval-batch-sizes", "1000", "--eval-repeats", "1"]
    session.run("python", "scripts/keras_anchor.py", *(session.posargs or tiny))
