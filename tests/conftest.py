"""Shared fixtures: the real dataset and one small trained run (shared helpers: tests/helpers.py).

The real Fashion-MNIST must be installed (Debian's dataset-fashion-mnist, or the four IDX files in
./data). CI installs it, and there a missing dataset fails the run; elsewhere those tests skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import DataError
from fmnist_lightning.settings import Settings
from fmnist_lightning.sources import SYSTEM_DATA_DIR, locate
from tests.helpers import tiny_settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _have_data() -> bool:
    try:
        locate(Path("data"), offline=True)
        return True
    except DataError:
        return False


@pytest.fixture(scope="session")
def real_data() -> None:
    if not _have_data():
        if os.environ.get("CI"):
            pytest.fail(f"Fashion-MNIST is missing in CI: install Debian's dataset-fashion-mnist ({SYSTEM_DATA_DIR})")
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def datamodule(real_data: None) -> FashionMNISTDataModule:
    from fmnist_lightning.training import build_datamodule

    dm = build_datamodule(Settings(offline=True))  # as `fit` builds it, with the training batch size
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def trained_run(real_data: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short run without dropout (so the round trip must restore that variant).

    Shared by the whole session: tests read it, and copy it (`copied_run`) before writing into it."""
    from fmnist_lightning.training import run_fit

    out = tmp_path_factory.mktemp("trained") / "run"
    run_fit(tiny_settings(dropout=False), out=out)
    return out


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `fmnist ARGS...` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    from fmnist_lightning.cli import main

    monkeypatch.setenv("COLUMNS", "240")  # rich wraps at the terminal width; keep paths on one line

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fmnist", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def copied_run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, for tests that write into a run folder."""
    import shutil

    return Path(shutil.copytree(trained_run, tmp_path / "copied-run"))
