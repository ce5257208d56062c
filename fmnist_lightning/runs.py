"""Run folders: the names of what they hold, where a new one goes, its lock, and reading them back.

This module imports neither torch nor lightning: rendering a report from a finished run folder
needs none of them.

A run folder holds `config.yaml` (resolved settings + provenance), `metrics.csv` (one row per
epoch), `checkpoints/best.ckpt` + `checkpoints/last.ckpt`, `curves.png`, and TensorBoard logs when
tensorboard is installed. `fmnist test` and `predict-samples` add their reports. Only global rank 0
writes into it. The names below are the one list of these files: the code that writes a file, the
code that reads it back and `fit --overwrite` (which removes these and nothing else) cannot disagree.
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from fmnist_lightning.errors import FmnistError, UsageError

CONFIG = "config.yaml"  # resolved settings + provenance
METRICS = "metrics.csv"  # one row per epoch
CURVES = "curves.png"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = f"{CHECKPOINT_DIR}/best.ckpt"
LAST_CHECKPOINT = f"{CHECKPOINT_DIR}/last.ckpt"
TEST_REPORT = "report.json"
PREDICTIONS = "predictions.csv"
CONFUSION_MATRIX = "confusion_matrix.png"
CORRECT_SAMPLES = "correct.png"
INCORRECT_SAMPLES = "incorrect.png"
HTML_REPORT = "report.html"
TENSORBOARD_DIR = "tensorboard"
PROFILE = "profile"  # Lightning's profilers name their reports fit-profile.txt and the like
MLFLOW_RUN = "mlflow-run.json"  # this run's MLflow tracking URI and run id (with --logger mlflow)
LOCK = ".lock"

FIT_FILES = (CONFIG, METRICS, CURVES)  # written by `fmnist fit`, besides its checkpoints
TEST_FILES = (TEST_REPORT, PREDICTIONS, CONFUSION_MATRIX)  # written by `fmnist test`
SAMPLE_FILES = (CORRECT_SAMPLES, INCORRECT_SAMPLES)  # written by `fmnist predict-samples`
RUN_FILES = (*FIT_FILES, BEST_CHECKPOINT, LAST_CHECKPOINT, *TEST_FILES, *SAMPLE_FILES, HTML_REPORT, MLFLOW_RUN)
RUN_FILE_PATTERNS = ("hpc_ckpt_*.ckpt",)  # Lightning's SLURM requeue checkpoints
RUN_FOLDERS = (TENSORBOARD_DIR,)

METRIC_COLUMNS = (
    "epoch",
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "val/f1_macro",
    "lr",
    "train_time_s",
    "images_per_s",
    "peak_rss_mb",
    "gpu_peak_mb",  # peak allocated GPU memory of the epoch, on a GPU
)

RUNS_ROOT = Path("runs")
# Set by the process that prepared the run folder, so the processes Lightning's DDP launcher
# starts from the same command line use that folder instead of numbering a new one.
RUN_DIR_ENV = "FMNIST_RUN_DIR"


def is_run(folder: Path) -> bool:
    return (folder / CONFIG).exists() or (folder / CHECKPOINT_DIR).exists()


def next_run_dir(root: Path = RUNS_ROOT) -> Path:
    """A new numbered folder `runs/001`, `runs/002`, ... (created, so two runs never share one)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    number = max(taken, default=0) + 1
    while True:
        candidate = root / f"{number:03d}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


@contextmanager
def claimed_run_dir(out: Path | None) -> Iterator[Path]:
    """`out`, or a new numbered run folder shared by every process of this run.

    Lightning's DDP launcher starts the other processes by re-running the same command line; they
    inherit the folder through the environment instead of numbering a new one.
    """
    if out is not None:
        yield out
        return
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        yield Path(inherited)
        return
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        raise UsageError("under torchrun or srun, give --out so every process writes the same run folder")
    run_dir = next_run_dir()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield run_dir
    except BaseException:
        if not any(run_dir.iterdir()):
            run_dir.rmdir()  # failed before writing anything: leave no empty numbered folder
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check (and create) the run folder; never touch a previous run without --resume/--overwrite."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder")
    if resume and not (run_dir / LAST_CHECKPOINT).is_file():
        raise UsageError(f"cannot resume: {run_dir / LAST_CHECKPOINT} does not exist")
    if not resume and not overwrite and is_run(run_dir):
        raise UsageError(
            f"{run_dir} already holds a run; use --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FmnistError(f"cannot create output folder {run_dir}: {exc.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise FmnistError(f"output folder {run_dir} is not writable")


def remove_run_files(run_dir: Path) -> None:
    """What --overwrite deletes: the files a previous run wrote, nothing the user put there."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for pattern in RUN_FILE_PATTERNS:
        for path in run_dir.glob(pattern):
            path.unlink()
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for path in profile_reports(run_dir):
        path.unlink()


def profile_reports(run_dir: Path) -> tuple[Path, ...]:
    """What --profiler wrote: fit-profile.txt, and Chrome traces named by the profiled action."""
    return tuple(sorted(run_dir.glob(f"*-{PROFILE}*")))


def remove_unstarted(run_dir: Path, existed: set[str] | None) -> None:
    """After a fit that failed before training started, remove what it created (lock, empty logs)."""
    for path in run_dir.iterdir():
        if existed is None or path.name not in existed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if existed is None:
        run_dir.rmdir()


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on a run folder, so two `fmnist fit` never write the same run.

    filelock takes an flock on Unix (and a Windows lock elsewhere), which the kernel releases when
    the process dies, even on kill -9: no stale locks.
    """
    lock = FileLock(run_dir / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FmnistError(
            f"another fmnist process is writing to {run_dir}; wait for it or choose another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()


def newest_checkpoint(run_dir: Path) -> Path | None:
    """What a restarted job resumes from: the newer of last.ckpt and the checkpoint Lightning's
    SLURM plugin saves before a requeue (`hpc_ckpt_N.ckpt` in the run folder), if any."""
    candidates = [p for p in (run_dir / LAST_CHECKPOINT, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def check_output_dir(out: Path) -> None:
    """Fail in a second, before any long computation, when `out` could not be created or written.
    (Nothing is created here: a command that fails later leaves no empty folder behind.)"""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FmnistError(f"cannot create output folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise FmnistError(f"output folder {out} is not writable")


def default_out_for(ckpt: Path) -> Path:
    """Reports go next to the run that produced the checkpoint (runs/001 for runs/001/checkpoints/best.ckpt)."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else ckpt.parent


def newest_best_checkpoint(root: Path = RUNS_ROOT) -> Path:
    """The best.ckpt of the newest run under `root` (newest by that file's modification time), for
    commands given no --ckpt."""
    found = [p for p in root.glob(f"**/{BEST_CHECKPOINT}") if p.is_file()] if root.is_dir() else []
    if not found:
        raise UsageError(f"no trained run under {root}/: train one first (fmnist fit), or pass --ckpt")
    return max(found, key=lambda p: p.stat().st_mtime)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv as floats (empty cells dropped)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def best_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """The epoch with the highest val/acc, the first of equals (as ModelCheckpoint keeps it); {}
    when no epoch was validated."""
    validated = [row for row in rows if "val/acc" in row]
    return max(validated, key=lambda row: row["val/acc"], default={})


def time_to_val_acc(rows: list[dict[str, float]], target: float) -> tuple[int, float] | None:
    """(epoch, training seconds) of the first epoch whose validation accuracy reached `target`:
    the sum of `train_time_s` up to it, validation excluded, as metrics.csv counts it."""
    seconds = 0.0
    for row in rows:
        seconds += row.get("train_time_s", 0.0)
        if row.get("val/acc", -1.0) >= target:
            return int(row["epoch"]), seconds
    return None


@functools.cache
def provenance() -> dict[str, Any]:
    """Versions and git commit, recorded in each run's config.yaml and checkpoints."""
    import platform
    import subprocess

    import lightning
    import torch

    from fmnist_lightning import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "fmnist_lightning": __version__,
        "torch": str(torch.__version__),
        "lightning": str(lightning.__version__),
        "python": platform.python_version(),
        "git_commit": commit or None,
    }
