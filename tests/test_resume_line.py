"""The line an interrupted run prints, `Continue with: fmnist fit --out RUN --resume`, works as
printed: run as it stands, in a shell, it restores every option of the run from its config.yaml
and ends with the metrics of a run that was never interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_lightning.settings import read_config
from tests.helpers import ended_output, epoch_metrics, pause_env, subprocess_env, wait_for_pause

# None of these is a default: each must come back from config.yaml for the metrics to match.
OPTIONS = ["--offline", "--accelerator", "cpu", "--no-progress", "--max-epochs", "3", "--batch-size", "64",
           "--limit-train-batches", "10", "--limit-val-batches", "2", "--lr", "0.003", "--lr-schedule", "onecycle",
           "--optimizer", "adamw", "--weight-decay", "0.0001", "--dropout-conv", "0.1", "--dropout-dense", "0.5",
           "--augment", "--seed", "7", "--deterministic", "--logger", "csv"]  # fmt: skip
PAUSE_STEP = 14  # in epoch 2 (steps 11-20 of 30)
TIMEOUT_S = 300


def _fit(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "fmnist_lightning", "fit", *OPTIONS, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_the_printed_resume_line_restores_the_run(real_data: None, tmp_path: Path) -> None:
    # `fmnist` by name, as a user types it: this Python's, importing this checkout.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    straight = _fit(subprocess_env(PATH=path), "--out", str(tmp_path / "straight"))
    _, err = straight.communicate(timeout=TIMEOUT_S)
    assert straight.returncode == 0, err[-3000:]

    pause = tmp_path / "pause"
    env = {**subprocess_env(PATH=path), **pause_env(pause, PAUSE_STEP)}
    cut = tmp_path / "cut run"  # a space: the printed line must quote what the shell would split
    interrupted = _fit(env, "--out", str(cut))
    wait_for_pause(pause, 1, lambda: interrupted.poll() is None, lambda: ended_output(interrupted), TIMEOUT_S)
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=TIMEOUT_S)
    assert interrupted.returncode == 130, err[-3000:]
    printed = re.findall(r"Continue with: (.+)$", err, re.MULTILINE)
    assert len(printed) == 1, err[-3000:]
    assert len(epoch_metrics(cut)) == 1  # stopped inside epoch 2

    resumed = subprocess.run(printed[0], shell=True, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, f"{printed[0]}\n{resumed.stderr[-3000:]}"
    assert [row["epoch"] for row in epoch_metrics(cut)] == [1.0, 2.0, 3.0]
    assert epoch_metrics(cut) == epoch_metrics(tmp_path / "straight")
    assert read_config(cut / "config.yaml")[0] == read_config(tmp_path / "straight" / "config.yaml")[0]
