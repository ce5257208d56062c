"""A run whose process dies (kill -9) continues by itself when its launcher starts it again: a
torchrun agent restarting the group (--max-restarts) or SLURM requeueing the job sets a restart
count, and `fmnist fit` then resumes from the run's newest checkpoint with no --resume typed."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ended_output, epoch_metrics, free_port, launcher_env, pause_env, saved_step, wait_for_pause

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
    run, pause = tmp_path / "run", tmp_path / "pause"
    first = _fit(run, **pause_env(pause, 38))  # paused inside epoch 2 (steps 31-60), after the save at 36
    wait_for_pause(pause, 1, lambda: first.poll() is None, lambda: ended_output(first))
    first.send_signal(signal.SIGKILL)  # no handler runs: only what was saved survives
    first.communicate(timeout=60)
    assert saved_step(run) == 36

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


def _workers(agent: int) -> dict[int, int]:
    """torchrun's worker processes (children of the agent): global rank -> pid."""
    children = Path(f"/proc/{agent}/task/{agent}/children")
    workers = {}
    for pid in children.read_text().split() if children.exists() else []:
        try:
            environ = dict(
                line.split(b"=", 1) for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in line
            )
        except OSError:
            continue
        if b"RANK" in environ:
            workers[int(environ[b"RANK"])] = int(pid)
    return workers


KILL_SEED = "FMNIST_KILL_SEED"  # set it to repeat a failed run's kill step
SAVES = (*range(4, 61, 4), 30)  # FIT's last.ckpt steps: every 4 optimiser steps and each epoch's end (30 a epoch)
RESTART_TIMEOUT_S = 300  # the rest of the run takes about a minute here; a hung restart fails at this limit


def _torchrun(agents: int, index: int, endpoint: str) -> list[str]:
    """The plain launch with one restart: torchrun --standalone with one agent; with two, each agent
    acts as a node of its own (the c10d rendezvous on 127.0.0.1, the first agent hosting it)."""
    if agents == 1:
        return ["torchrun", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    host = f"is_host={int(index == 0)}"
    return ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", "restart", "--rdzv-conf", host]  # fmt: skip


def _stop(agents: list[subprocess.Popen[bytes]]) -> None:
    """Kill what is left of a launch: torchrun starts each worker in a session of its own, so
    killing an agent's process group leaves its workers running."""
    for agent in agents:
        if agent.poll() is None:
            for pid in _workers(agent.pid).values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


@pytest.fixture(scope="module")
def uninterrupted_run(real_data: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FIT on two processes (Lightning's own launcher), never interrupted: what a restarted run must equal."""
    whole = tmp_path_factory.mktemp("whole") / "run"
    args = [sys.executable, *FIT, "--devices", "2", "--strategy", "ddp", "--out", str(whole)]
    done = subprocess.run(args, cwd=whole.parent, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("agents", [1, 2], ids=["one-agent-two-processes", "two-agents-as-two-nodes"])
def test_torchrun_restarts_the_group_and_it_resumes_by_itself(
    real_data: None, tmp_path: Path, agents: int, uninterrupted_run: Path
) -> None:
    """docs/scaling.md, 'When a process dies': the plain torchrun launch with --max-restarts 1 (the
    agents' shared store, torch's default; `fit` with no --devices, --strategy or store settings),
    two processes under one agent or under two agents acting as two nodes. Every process pauses at
    a step drawn at random; the last agent's worker is killed there with SIGKILL; the agents start
    the group again, it connects (elastic.py: before, it failed or hung in init_process_group on
    the previous group's keys), resumes from last.ckpt with no --resume (or starts again, killed
    before the first save), and the run ends with exactly the metrics of an uninterrupted
    two-process run.

    With two agents, the one whose worker died counts a restart; the other may restart its worker
    for the re-rendezvous without counting one (a race): then the run's record of the agents makes
    it resume all the same (training.restarted_by_launcher)."""
    seed = int(os.environ.get(KILL_SEED) or random.SystemRandom().randrange(10**6))
    step = random.Random(seed).randint(1, 59)  # any step of the two epochs but the last
    kill = f"killed at step {step} ({KILL_SEED}={seed} repeats it)"
    run = tmp_path / "run"
    nodes = ["--num-nodes", "2"] if agents == 2 else []  # devices: by default, the processes torchrun started per node
    fit = [*FIT[3:], *nodes, "--out", str(run)]
    endpoint = f"127.0.0.1:{free_port()}"
    pause = tmp_path / "pause"
    env = launcher_env(**pause_env(pause, step))
    logs = [tmp_path / f"agent{i}.log" for i in range(agents)]

    def output() -> str:
        return f"{kill}\n" + "\n".join(f"--- {log.name}:\n{log.read_text()[-4000:]}" for log in logs)

    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, log in enumerate(logs):
            with log.open("w") as out:
                procs.append(
                    subprocess.Popen(
                        [*_torchrun(agents, i, endpoint), "-m", "fmnist_lightning", "fit", *fit],
                        cwd=tmp_path,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                )
        wait_for_pause(pause, 2, lambda: all(p.poll() is None for p in procs), output)
        workers = _workers(procs[-1].pid)
        victim = workers.get(1) if agents == 1 else next(iter(workers.values()), None)
        assert victim is not None, f"no worker to kill under the last torchrun agent: {workers}\n{output()}"
        os.kill(victim, signal.SIGKILL)
        assert saved_step(run) == max((s for s in SAVES if s < step), default=-1), output()
        (pause / "go").touch()  # the survivor goes on, and finds its peer gone
        killed = time.monotonic()
        for p in procs:
            try:
                p.wait(timeout=max(1.0, killed + RESTART_TIMEOUT_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the restarted group hung: not done {RESTART_TIMEOUT_S} s after the kill\n{output()}")
    finally:
        _stop(procs)
    print(f"{kill}: agents exited {[p.returncode for p in procs]}, {time.monotonic() - killed:.0f} s after the kill")
    assert [p.returncode for p in procs] == [0] * agents, output()
    assert "failed (exitcode: -9)" in logs[-1].read_text(), output()  # the agent saw its worker die
    text = "".join(log.read_text() for log in logs)
    assert "restart 1 of this job" in text or "torchrun agent started it again" in text, output()
    assert ("resuming from" in text and "last.ckpt" in text) or step <= SAVES[0], output()
    recorded = yaml.safe_load((run / "config.yaml").read_text())["provenance"]["torchrun_agents"]
    assert sorted(int(agent.split(":")[1]) for agent in recorded) == sorted(p.pid for p in procs)
    assert all(agent.startswith(f"{socket.gethostname()}:") for agent in recorded)
    assert [row["epoch"] for row in epoch_metrics(run)] == [1.0, 2.0], output()
    assert epoch_metrics(run) == epoch_metrics(uninterrupted_run), output()


def test_a_run_restarted_before_its_first_checkpoint_starts_again(
    real_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed before anything was saved, the job's restart finds a run folder with no checkpoint:
    it starts the run again instead of refusing the folder (which ended the job, exit 2)."""
    from fmnist_lightning.settings import Settings
    from fmnist_lightning.training import run_fit

    run = tmp_path / "run"
    settings = Settings(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, offline=True,
                        progress=False)  # fmt: skip
    run_fit(settings, out=run)
    for checkpoint in (run / "checkpoints").iterdir():  # as if killed before the first save
        checkpoint.unlink()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    caplog.set_level(logging.INFO, logger="fmnist_lightning")
    run_fit(settings, out=run)
    assert "restart 1 of this job: no checkpoint yet, starting again" in caplog.text
    assert [row["epoch"] for row in epoch_metrics(run)] == [1.0]
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_run_resumed_from_the_checkpoint_of_an_epochs_end_counts_the_next_epoch_alone(
    real_data: None, tmp_path: Path
) -> None:
    """last.ckpt saved at the end of epoch 1 holds that epoch's running train metrics (Lightning
    computes them after the save). Resumed from it, epoch 2 must start them from zero: it used to
    add epoch 2 onto epoch 1's sums, so its train loss and accuracy were those of both epochs
    (the kill at step 31 in test_torchrun_restarts_the_group_and_it_resumes_by_itself found it)."""
    from lightning.pytorch.callbacks import Callback

    from fmnist_lightning.training import run_fit
    from tests.helpers import tiny_settings

    class DieInEpoch2(Callback):  # before epoch 2's first step: the last save was epoch 1's end
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.current_epoch == 1:
                raise RuntimeError("killed")

    settings = tiny_settings(deterministic=True, seed=3)  # two epochs of 30 steps, last.ckpt at each end
    run_fit(settings, out=tmp_path / "whole")
    with pytest.raises(RuntimeError, match="killed"):
        run_fit(settings, out=tmp_path / "run", extra_callbacks=[DieInEpoch2()])
    assert saved_step(tmp_path / "run") == 30
    run_fit(settings, out=tmp_path / "run", resume=True)
    assert epoch_metrics(tmp_path / "run") == epoch_metrics(tmp_path / "whole")


def test_a_process_its_torchrun_agent_started_again_resumes_with_a_restart_count_of_0(
    real_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On several nodes an agent restarts its healthy workers for another node's failure without
    counting a restart: its workers see TORCHELASTIC_RESTART_COUNT=0 and still continue the run,
    because their agent is one the run recorded. Another launch's processes are still refused."""
    from fmnist_lightning.errors import UsageError
    from fmnist_lightning.hardware import torchrun_agent
    from fmnist_lightning.settings import Settings
    from fmnist_lightning.training import run_fit

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # as torchrun sets it; this test process is the "worker"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    settings = Settings(accelerator="cpu", max_epochs=2, lr_schedule="none", limit_train_batches=2,
                        limit_val_batches=1, offline=True, progress=False)  # fmt: skip
    run = tmp_path / "run"
    run_fit(settings.replace(max_epochs=1), out=run)
    config = run / "config.yaml"
    assert yaml.safe_load(config.read_text())["provenance"]["torchrun_agents"] == [torchrun_agent()]

    caplog.set_level(logging.INFO, logger="fmnist_lightning")
    run_fit(settings, out=run)  # started again by the same agent, count still 0
    assert "this job's torchrun agent started it again: resuming from" in caplog.text
    assert [row["epoch"] for row in epoch_metrics(run)] == [1.0, 2.0]

    config.write_text(config.read_text().replace(str(torchrun_agent()), "another-host:1:1"))
    with pytest.raises(UsageError, match="already holds a run"):
        run_fit(settings.replace(max_epochs=3), out=run)


def test_without_a_restart_count_an_existing_run_is_still_refused(real_data: None, tmp_path: Path, cli) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = cli("fit", "--offline", "--out", tmp_path / "run")
    assert code == 2 and "already holds a run" in err
