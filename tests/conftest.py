"""Shared fixtures: the real dataset and one small trained run (shared helpers: tests/helpers.py),
and the two rules every test runs under:

- Under CI (the CI variable set, as `.ci/run` does) nothing skips: a test that would skip fails, with
  the reason. CI installs the dataset, every extra, Chromium, SLURM and PostgreSQL, so a skip there
  means a missing piece; elsewhere a test skips what the machine lacks.
- No test hangs: pytest-timeout fails a test that runs past its limit (pyproject's `timeout`, or its
  own timeout mark) by SIGALRM, and the run goes on. A test stuck where that signal cannot reach it
  (inside C code) ends the run instead, its name and stacks printed, a little after.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import DataError
from fmnist_lightning.settings import Settings
from fmnist_lightning.sources import SYSTEM_DATA_DIR, locate
from tests.helpers import tiny_settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped under CI, where every test must run: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield  # a whole module skipped (pytest.skip(allow_module_level=True), importorskip at import)
    if IN_CI and report.skipped:
        _fail_skip(report)
    return report


# Teardown after a timeout may still stop processes (up to a minute each); past this, the test is stuck.
STUCK_AFTER_S = 180
_BACKSTOP = pytest.StashKey[threading.Timer]()


@pytest.hookimpl(wrapper=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Any:
    started = yield
    if settings.method == "signal":
        backstop = threading.Timer(settings.timeout + STUCK_AFTER_S, _end_the_run, (item, settings))
        backstop.daemon = True
        backstop.start()
        item.stash[_BACKSTOP] = backstop
    return started


@pytest.hookimpl(wrapper=True, optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> Any:
    if (backstop := item.stash.get(_BACKSTOP, None)) is not None:
        backstop.cancel()
    return (yield)


def _end_the_run(item: pytest.Item, settings: Any) -> None:
    import pytest_timeout

    sys.stderr.write(
        f"\n{item.nodeid} is stuck: still running {STUCK_AFTER_S} s after its {settings.timeout:g} s limit, where "
        "SIGALRM cannot reach it (inside C code); the run ends here\n"
    )
    pytest_timeout.timeout_timer(item, settings)  # every thread's stack, then os._exit(1)


def _have_data() -> bool:
    try:
        locate(Path("data"), offline=True)
        return True
    except DataError:
        return False


@pytest.fixture(scope="session")
def real_data() -> None:
    if not _have_data():
        pytest.skip(f"Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist ({SYSTEM_DATA_DIR})")


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
