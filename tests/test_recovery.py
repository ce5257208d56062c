"""A run whose process dies (kill -9) continues by itself when its launcher starts it again: a
torchrun agent restarting the group (--max-restarts) or SLURM requeueing the job sets a restart
count, and `fmnist fit` then resumes from the run's newest checkpoint with no --resume typed."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import epoch_metrics, free_port, launcher_env, saved_step

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


def _worker_with_rank(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process (a child of the agent) that has RANK=`rank`."""
    children = Path(f"/proc/{agent}/task/{agent}/children")
    for pid in children.read_text().split() if children.exists() else []:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_torchrun_restarts_the_group_and_it_resumes_by_itself(real_data: None, tmp_path: Path) -> None:
    """README, 'When a process dies': torchrun --max-restarts 1 with the c10d rendezvous, two
    processes. Rank 1 is killed with SIGKILL inside epoch 2; the agent stops rank 0 and starts both
    again with TORCHELASTIC_RESTART_COUNT=1; they resume from last.ckpt with no --resume, and the
    run ends with exactly the metrics of an uninterrupted two-process run.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each restart a fresh store (see
    hardware.torchrun_restart_warning): without it the restarted group fails to connect."""
    run = tmp_path / "run"
    fit = [*FIT[3:], "--devices", "2", "--strategy", "ddp", "--out", str(run)]
    torchrun = ["torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1",
                "--monitor-interval", "0.2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv-id", "restart"]  # fmt: skip
    env = launcher_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        agent = subprocess.Popen(
            [*torchrun, "-m", "fmnist_lightning", "fit", *fit],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while saved_step(run) < 36 and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until a periodic save inside epoch 2 (steps 31-60)
        assert agent.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
        victim = _worker_with_rank(agent.pid, 1)
        assert victim is not None, "no worker with RANK=1 under the torchrun agent"
        os.kill(victim, signal.SIGKILL)
        saved = saved_step(run)
        assert 36 <= saved < 60, saved
        agent.wait(timeout=600)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    output = log.read_text()
    assert agent.returncode == 0, output[-5000:]
    assert "failed (exitcode: -9) local_rank: 1" in output, output[-5000:]  # the agent saw rank 1 die
    assert "restart 1 of this job: resuming from" in output and "last.ckpt" in output, output[-5000:]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" not in output  # this launch needs no warning
    provenance = yaml.safe_load((run / "config.yaml").read_text())["provenance"]
    (recorded,) = provenance["torchrun_agents"]  # both ranks under the one agent
    assert recorded.startswith(f"{socket.gethostname()}:{agent.pid}:")

    whole = tmp_path / "whole"
    args = [sys.executable, *FIT, "--devices", "2", "--strategy", "ddp", "--out", str(whole)]
    done = subprocess.run(args, cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["epoch"] for row in epoch_metrics(run)] == [1.0, 2.0]
    assert epoch_metrics(run) == epoch_metrics(whole)


def test_a_torchrun_launch_whose_restarts_would_fail_is_warned(
    real_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fmnist_lightning.config import Settings
    from fmnist_lightning.hardware import torchrun_restart_warning
    from fmnist_lightning.training import run_fit

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert torchrun_restart_warning() is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # the shared store (torch's default)
    settings = Settings(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, offline=True,
                        progress=False)  # fmt: skip
    run_fit(settings, out=tmp_path / "run")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text


def test_a_process_its_torchrun_agent_started_again_resumes_with_a_restart_count_of_0(
    real_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On several nodes an agent restarts its healthy workers for another node's failure without
    counting a restart: its workers see TORCHELASTIC_RESTART_COUNT=0 and still continue the run,
    because their agent is one the run recorded. Another launch's processes are still refused."""
    from fmnist_lightning.config import Settings
    from fmnist_lightning.errors import UsageError
    from fmnist_lightning.hardware import torchrun_agent
    from fmnist_lightning.training import run_fit

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # as torchrun sets it; this test process is the "worker"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    settings = Settings(accelerator="cpu", max_epochs=2, lr_schedule="none", limit_train_batches=2,
                        limit_val_batches=1, offline=True, progress=False)  # fmt: skip
    run = tmp_path / "run"
    run_fit(settings.model_copy(update={"max_epochs": 1}), out=run)
    config = run / "config.yaml"
    assert yaml.safe_load(config.read_text())["provenance"]["torchrun_agents"] == [torchrun_agent()]

    caplog.set_level(logging.INFO, logger="fmnist_lightning")
    run_fit(settings, out=run)  # started again by the same agent, count still 0
    assert "this job's torchrun agent started it again: resuming from" in caplog.text
    assert [row["epoch"] for row in epoch_metrics(run)] == [1.0, 2.0]

    config.write_text(config.read_text().replace(str(torchrun_agent()), "another-host:1:1"))
    with pytest.raises(UsageError, match="already holds a run"):
        run_fit(settings.model_copy(update={"max_epochs": 3}), out=run)


def test_without_a_restart_count_an_existing_run_is_still_refused(real_data: None, tmp_path: Path, cli) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = cli("fit", "--offline", "--out", tmp_path / "run")
    assert code == 2 and "already holds a run" in err
