"""scripts/slurm/train.sbatch, submitted for real to a one-machine SLURM cluster (scripts/slurm/local_cluster.sh):
one node, two CPU tasks, gloo. Needs root and Debian's slurm-wlm and munge; skipped without them
(under CI, where they are installed, a skip fails: conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, TINY_FIT, epoch_metrics, free_port, launcher_env, pause_env, saved_step, wait_for_pause

CLUSTER = ROOT / "scripts" / "slurm" / "local_cluster.sh"
TRAIN = ROOT / "scripts" / "slurm" / "train.sbatch"
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "srun")


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """A running local cluster; yields the environment its clients need (SLURM_CONF)."""
    missing = [t for t in SLURM_TOOLS if not shutil.which(t, path=launcher_env()["PATH"])]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (slurmd runs the jobs)")
    # Not under pytest's base temp folder: another pytest on the machine may rotate that away.
    folder = Path(tempfile.mkdtemp(prefix="fmnist-slurm-"))
    start = subprocess.run(
        [str(CLUSTER), "start", str(folder)], env=launcher_env(), capture_output=True, text=True, timeout=120
    )
    if start.returncode != 0:
        subprocess.run([str(CLUSTER), "stop", str(folder)], env=launcher_env(), timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"the local SLURM cluster did not start:\n{start.stderr}")
    try:
        yield {"SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], env=launcher_env(), timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _diagnosis(env: dict[str, str]) -> str:
    queue = subprocess.run(["squeue"], env=env, capture_output=True, text=True, timeout=30).stdout
    ctld = Path(env["SLURM_CONF"]).parent / "slurmctld.log"
    return f"squeue:\n{queue}\nslurmctld.log:\n{ctld.read_text()[-3000:] if ctld.exists() else ''}"


def test_train_sbatch_on_a_local_cluster(real_data: None, slurm_env: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work"  # the job's working folder (its runs/ folder is there)
    work.mkdir()
    log = tmp_path / "job.log"
    # CPU instead of the script's 2 nodes x 4 GPUs: sbatch options override its #SBATCH lines, and
    # the header's FMNIST_ACCELERATOR picks the CPU; FMNIST adds --debug so Lightning says what it did.
    env = launcher_env(**slurm_env, FMNIST_ACCELERATOR="cpu", FMNIST="fmnist --debug")
    shape = ["--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1"]
    sbatch = ["sbatch", "--wait", "--parsable", *shape, "--time", "10", "--chdir", str(work), "--output", str(log)]
    fit_options = [*TINY_FIT, "--limit-val-batches", "2", "--test"]
    try:
        job = subprocess.run([*sbatch, str(TRAIN), *fit_options], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        output = log.read_text()[-5000:] if log.exists() else "(no output)"
        pytest.fail(f"the job did not finish in 5 minutes:\n{output}\n{_diagnosis(env)}")
    output = log.read_text() if log.exists() else ""
    print(output)
    assert job.returncode == 0, f"sbatch: {job.stderr}\njob output:\n{output[-5000:]}\n{_diagnosis(env)}"
    job_id = job.stdout.strip().split(";")[0]
    state = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30)
    assert "JobState=COMPLETED" in state.stdout and "ExitCode=0:0" in state.stdout, state.stdout

    # Lightning took the ranks from SLURM (srun --label prefixes each line with its task's rank):
    # task 1 is global rank 1 of 2, and Lightning set up SLURM's requeue-on-signal handlers.
    assert "0: Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in output
    assert "1: Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    for task in (0, 1):
        assert f"{task}: SLURM auto-requeueing enabled" in output
    assert "srun` command is available on your system but is not used" not in output

    assert [p.name for p in (work / "runs").iterdir()] == [f"slurm-{job_id}"]  # one run folder, the job's
    run = work / "runs" / f"slurm-{job_id}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch, written once
    report = json.loads((run / "report.json").read_text())
    assert report["num_samples"] == 10000
    predictions = (run / "predictions.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in predictions] == list(range(10000))

    # Recorded by the run itself (config.yaml's provenance block).
    provenance = yaml.safe_load((run / "config.yaml").read_text())["provenance"]
    assert provenance.get("cluster_environment") == "SLURMEnvironment", provenance
    assert provenance.get("world_size") == 2, provenance


REQUEUE_FIT = ["--offline", "--max-epochs", "2", "--limit-train-batches", "40", "--batch-size", "64",
               "--limit-val-batches", "2", "--checkpoint-every-n-steps", "5", "--seed", "3", "--deterministic",
               "--no-progress"]  # fmt: skip


def _scontrol(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"scontrol {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_a_requeued_job_resumes_its_run(real_data: None, slurm_env: dict[str, str], tmp_path: Path) -> None:
    """`scontrol requeue` (what preemption or the script's time-limit trap does): SLURM SIGTERMs the
    tasks, which save last.ckpt and stop; the job starts again with the same id, so the same run
    folder, and SLURM_RESTART_COUNT=1, on which fit resumes; the log of both starts is in one file."""
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "job.log"
    # Both tasks pause inside epoch 2 (steps 41-80) after step 47, the save at 45 done, until SIGTERM.
    pause = tmp_path / "pause"
    env = launcher_env(**slurm_env, FMNIST_ACCELERATOR="cpu", FMNIST="fmnist", **pause_env(pause, 47))
    shape = ["--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1"]
    sbatch = ["sbatch", "--parsable", *shape, "--time", "10", "--chdir", str(work), "--output", str(log)]
    submitted = subprocess.run([*sbatch, str(TRAIN), *REQUEUE_FIT], env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    run = work / "runs" / f"slurm-{job_id}"

    def job_state() -> str:
        return _scontrol(env, "show", "job", job_id)

    def failure(what: str) -> str:
        output = log.read_text()[-5000:] if log.exists() else "(no output)"
        return f"{what}\njob output:\n{output}\n{job_state()}\n{_diagnosis(env)}"

    def alive() -> bool:  # one reading: two could see PENDING, then RUNNING, and match neither
        state = job_state()
        return any(f"JobState={alive}" in state for alive in ("PENDING", "CONFIGURING", "RUNNING"))

    wait_for_pause(pause, 2, alive, lambda: failure("the job ended early"), timeout_s=240)
    assert saved_step(run) == 45, failure(f"last.ckpt is at step {saved_step(run)}, not 45")
    _scontrol(env, "requeue", job_id)  # SIGTERM: the tasks go on from the pause and stop at their next check
    # A requeued job waits (Reason=BeginTime) before it may start again: let it start now, once
    # the first start has ended (its tasks save last.ckpt on SIGTERM first).
    deadline = time.monotonic() + 120
    while "JobState=PENDING" not in job_state():
        assert time.monotonic() < deadline, failure("the requeued job did not go back to PENDING")
        time.sleep(0.2)
    _scontrol(env, "update", f"JobId={job_id}", "StartTime=now")
    deadline = time.monotonic() + 240
    while "JobState=COMPLETED" not in (state := job_state()):
        assert time.monotonic() < deadline, failure("the requeued job did not complete in 4 minutes")
        assert "JobState=FAILED" not in state and "JobState=CANCELLED" not in state, failure("the job failed")
        time.sleep(0.5)
    output = log.read_text()
    print(output)
    assert "Restarts=1" in state and "ExitCode=0:0" in state, state

    # Both starts' output, appended in one log: the first stopped on SIGTERM after saving, the second resumed.
    assert f"job {job_id}, start 1 " in output and f"job {job_id}, start 2 " in output
    assert "0: interrupted: stopped by SIGTERM in epoch 2 after step 60;" in output
    assert f"0: restart 1 of this job: resuming from runs/slurm-{job_id}/checkpoints/last.ckpt" in output
    assert [p.name for p in (work / "runs").iterdir()] == [f"slurm-{job_id}"]
    assert [row["epoch"] for row in epoch_metrics(run)] == [1.0, 2.0]  # epoch 1's row written once

    # The same fit never interrupted, with the same two processes (Lightning starts rank 1 itself).
    whole = tmp_path / "whole"
    args = ["fmnist", "fit", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *REQUEUE_FIT]
    done = subprocess.run(
        [*args, "--out", str(whole)], env=launcher_env(MASTER_PORT=str(free_port())),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    # Weights, optimiser, RNG, the position in the epoch and each rank's running train metrics were
    # restored: the numbers are exactly those of the run never interrupted.
    assert epoch_metrics(run) == epoch_metrics(whole)
