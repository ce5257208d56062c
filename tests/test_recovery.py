"""A run whose process dies (kill -9) continues by itself when its launcher starts it again: a
torchrun agent restarting the group (--max-restarts) or SLURM requeueing the job sets a restart
count, and `fmnist fit` then resumes from the run's newest checkpoint with no --resume typed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import epoch_metrics, saved_step

FIT = ["-m", "fmnist_lightning", "fit", "--accelerator", "cpu", "--max-epochs", "2", "--batch-size", "64",
       "--limit-train-batches", "30", "--limit-val-batches", "2", "--checkpoint-every-n-steps", "4", "--seed", "5",
       "--deterministic", "--offline", "--no-progress"]  # fmt: skip


def _fit(run: Path, **env: str) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "PYTHONUNBUFFERED": "1", **env}
    for name in ("FMNIST_RUN_DIR", "TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        full_env.pop(name, None) if name not in env else None
    args = [sys.executable, *FIT, "--out", str(run)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


@pytest.mark.slow
@pytest.mark.parametrize("restart_variable", ["TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"])
def test_a_killed_run_restarted_by_its_launcher_resumes_by_itself(
    real_data: None, tmp_path: Path, restart_variable: str
) -> None:
    run = tmp_path / "run"
    first = _fit(run)
    deadline = time.monotonic() + 300
    while saved_step(run) < 36 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until a periodic save inside epoch 2 (steps 31-60)
    assert first.poll() is None, "the run ended before it could be killed"
    first.send_signal(signal.SIGKILL)  # no handler runs: only what was saved survives
    first.communicate(timeout=60)
    saved = saved_step(run)
    assert 36 <= saved < 60

    again = _fit(run, **{restart_variable: "1"})  # the same command line, as the launcher reruns it
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "restart 1 of this job: resuming from" in err and "last.ckpt" in err

    whole = _fit(tmp_path / "whole")
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    # Weights, optimiser, schedule, RNG, the position in the epoch and the epoch's running train
    # metrics were all restored: the numbers are those of the run that was never interrupted.
    assert [row["epoch"] for row in epoch_metrics(run)] == [1.0, 2.0]
    assert epoch_metrics(run) == epoch_metrics(tmp_path / "whole")


def test_without_a_restart_count_an_existing_run_is_still_refused(real_data: None, tmp_path: Path, cli) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = cli("fit", "--offline", "--out", tmp_path / "run")
    assert code == 2 and "already holds a run" in err
