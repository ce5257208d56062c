"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from fmnist_lightning.settings import Settings


def is_png(path: Path) -> bool:
    from PIL import Image

    if not path.is_file() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    with Image.open(path) as image:
        image.verify()
    return True


def tiny_settings(**changes: Any) -> Settings:
    """A run of a few seconds on the CPU with the real data: two short epochs, no progress bar."""
    base = dict(max_epochs=2, limit_train_batches=30, limit_val_batches=2, offline=True, progress=False)
    return Settings(**{**base, "accelerator": "cpu", **changes})


def classifier(input_mean: float = 0.0, input_std: float = 1.0, **settings: Any) -> Any:
    """A FashionClassifier built as `fmnist fit` builds it, from settings (defaults unless given)."""
    from fmnist_lightning.model import FashionClassifier

    s = Settings(**settings)
    return FashionClassifier.from_settings(s.model, s.optimisation, input_mean, input_std)


# The tests that run the real launchers (torchrun, SLURM) in subprocesses.
ROOT = Path(__file__).resolve().parents[1]
# A fit in seconds: the launchers are what is under test, not the learning.
TINY_FIT = ["--offline", "--max-epochs", "1", "--limit-train-batches", "4", "--no-progress"]


def launcher_env(**extra: str) -> dict[str, str]:
    """A clean environment for a launched process: this Python's bin first on PATH (torchrun, fmnist),
    this checkout's package first on the import path, one thread per process (two processes share
    two cores here), and nothing inherited that could steer Lightning (no SLURM_* or RANK)."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    return env | extra


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(module: str, extra: str) -> None:
    """Skip when an optional package is missing; in CI (which installs every extra) fail instead."""
    import importlib.util
    import os

    import pytest

    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed: pip install 'fmnist-lightning[{extra}]'"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for an `fmnist` subprocess: this checkout's package, a wide terminal."""
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


def pause_env(folder: Path, step: int) -> dict[str, str]:
    """The environment in which every process of a launched run pauses at the end of `step`, until
    a signal reaches it or `folder/go` exists (tests/pausing.py). It replaces PYTHONPATH: this
    checkout first, then the folder that registers the pause as a Lightning entry point."""
    from tests.pausing import VARIABLE

    plugin = folder / "entry-point"
    info = plugin / "fmnist_test_pause-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fmnist-test-pause\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[lightning.pytorch.callbacks_factory]\nfmnist_test_pause = tests.pausing:callbacks\n"
    )
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{plugin}", VARIABLE: f"{step}:{folder}"}


def wait_for_pause(folder: Path, ranks: int, running: Any, describe: Any = lambda: "", timeout_s: float = 300) -> None:
    """Until every rank of a run started with `pause_env(folder, ...)` has paused; fails at once
    when `running()` says the run has ended, or after `timeout_s`, with `describe()` (its output)."""
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    while not all((folder / f"paused-rank{rank}").exists() for rank in range(ranks)):
        if not running():
            pytest.fail(f"the run ended before it paused:\n{describe()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the run did not pause in {timeout_s:.0f} s:\n{describe()}")
        time.sleep(0.05)


def ended_output(proc: Any) -> str:
    """The tail of a finished process's captured output (stdout and stderr pipes, text mode)."""
    if proc.poll() is None:
        return "(still running)"
    out, err = proc.communicate(timeout=60)
    return f"exit code {proc.returncode}\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}"


def wait_until(ready: Any, timeout_s: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.5)


# Restart and resume tests: where a run's last checkpoint has got to, and its per-epoch metrics.
EPOCH_METRICS = ("epoch", "train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro")


def saved_step(run: Path) -> int:
    """The global step of the run's last.ckpt; -1 while it is not there yet or being replaced."""
    import torch

    try:
        return int(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def epoch_metrics(run: Path) -> list[dict[str, float]]:
    """metrics.csv's rows, restricted to the metrics a resumed run must reproduce exactly."""
    import csv

    with (run / "metrics.csv").open() as f:
        return [{k: float(row[k]) for k in EPOCH_METRICS} for row in csv.DictReader(f)]
