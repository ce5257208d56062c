"""`fmnist fit` as a library call: hardware from settings, the run folder, callbacks, the Trainer.

A run folder holds `config.yaml` (resolved settings + provenance), `metrics.csv` (one row per
epoch), `checkpoints/best.ckpt` + `checkpoints/last.ckpt`, `curves.png`, and TensorBoard logs when
tensorboard is installed. Only global rank 0 writes into it.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import os
import resource
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fmnist_lightning.config import Settings, load_yaml, provenance, resolve_settings, save_yaml
from fmnist_lightning.data import Augment, FashionMNISTDataModule
from fmnist_lightning.errors import FmnistError, TrainingInterrupted, UsageError
from fmnist_lightning.model import FashionClassifier
from fmnist_lightning.run_files import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CONFIG,
    CURVES,
    LAST_CHECKPOINT,
    METRICS,
    RUN_FILES,
    RUN_FOLDERS,
    TENSORBOARD_DIR,
)

RUNS_ROOT = Path("runs")
# Set by the process that prepared the run folder, so the processes Lightning's DDP launcher
# starts from the same command line use that folder instead of numbering a new one.
RUN_DIR_ENV = "FMNIST_RUN_DIR"
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
)


# ---------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class Hardware:
    accelerator: str
    devices: int | list[int]
    strategy: str
    precision: str
    num_nodes: int = 1

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "gpu"


def _parse_devices(devices: str) -> int | list[int] | str:
    if devices == "auto":
        return "auto"
    if "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return int(devices)


def resolve_hardware(
    accelerator: str = "auto",
    devices: str = "auto",
    strategy: str = "auto",
    precision: str = "auto",
    num_nodes: int = 1,
    gpus: int | None = None,
) -> Hardware:
    """Turn the user's hardware options into concrete Trainer arguments, or raise UsageError."""
    wanted = _parse_devices(devices)
    if gpus is not None:
        accelerator = "gpu" if gpus > 0 else "cpu"
        wanted = gpus if gpus > 0 else wanted
    if wanted == 0:
        raise UsageError("--devices must be at least 1")
    visible = torch.cuda.device_count()
    if accelerator == "auto":
        accelerator = "gpu" if visible else "cpu"
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    count = (max(visible, 1) if accelerator == "gpu" else 1) if isinstance(wanted, str) else wanted
    n = len(count) if isinstance(count, list) else count
    if accelerator == "gpu":
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(visible))
        if visible == 0:
            raise UsageError(f"asked for {n} GPU(s) but no GPU is visible; use --gpus 0 or --accelerator cpu")
        if n > visible or (isinstance(count, list) and max(count) >= visible):
            raise UsageError(f"asked for GPUs {count} but only {visible} visible ({names})")
    elif isinstance(count, list):
        raise UsageError("a list of device ids only makes sense for GPUs; give --devices N for CPU processes")
    if strategy == "auto":
        strategy = "ddp" if n * num_nodes > 1 else "auto"
    on_gpu = accelerator == "gpu"
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    if precision == "16-mixed" and not on_gpu:
        raise UsageError("precision 16-mixed needs a GPU; on the CPU use bf16-mixed or 32-true")
    if precision == "bf16-mixed" and on_gpu and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU cannot do bf16-mixed; use --precision 16-mixed or 32-true")
    return Hardware(accelerator, count, strategy, precision, num_nodes)


def hardware_for(s: Settings) -> Hardware:
    return resolve_hardware(s.accelerator, s.devices, s.strategy, s.precision, s.num_nodes, s.gpus)


# ---------------------------------------------------------------------------------------------
# Run folders


def _is_run(folder: Path) -> bool:
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


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check (and create) the run folder; never touch a previous run without --resume/--overwrite."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder")
    if resume and not (run_dir / LAST_CHECKPOINT).is_file():
        raise UsageError(f"cannot resume: {run_dir / LAST_CHECKPOINT} does not exist")
    if not resume and not overwrite and _is_run(run_dir):
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
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _remove_unstarted(run_dir: Path, existed: set[str] | None) -> None:
    """After a fit that failed before training started, remove what it created (lock, empty logs)."""
    for path in run_dir.iterdir():
        if existed is None or path.name not in existed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if existed is None:
        run_dir.rmdir()


class RunLock:
    """An exclusive lock on a run folder, so two `fmnist fit` never write the same run.

    flock is released by the kernel when the process dies, even on kill -9: no stale locks.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FmnistError(
                f"another fmnist process (pid {holder}) is writing to {self.path.parent}; "
                "wait for it or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------
# Callbacks and plugins


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename it into place.

    A process killed mid-save (kill -9, power loss) leaves the previous checkpoint intact, never
    a half-written one; a full disk is a clear error and also keeps the previous file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-save
                stale.unlink(missing_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise FmnistError(
                    f"disk full while saving {path}; the previous checkpoint is intact. "
                    "Free some space, then continue with --resume"
                ) from None
            raise FmnistError(f"cannot save checkpoint {path}: {exc.strerror}") from None


class EpochMetricsCSV(Callback):
    """One row per epoch in `metrics.csv`: train and val loss/accuracy, lr and training speed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._start = 0.0
        self._train_time = 0.0
        self._images = 0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # once per epoch: honest timings

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch skips on_train_epoch_start for that epoch: time it from here.
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self._start, self._train_time, self._images = time.perf_counter(), 0.0, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch.labels) * trainer.world_size

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training and not self._train_time:
            self._sync(pl_module)
            self._train_time = time.perf_counter() - self._start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._train_time:
            self._sync(pl_module)
            self._train_time = time.perf_counter() - self._start
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in METRIC_COLUMNS}
        row: dict[str, Any] = {
            **metrics,
            "epoch": trainer.current_epoch + 1,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train_time_s": round(self._train_time, 3),
            "images_per_s": round(self._images / self._train_time, 1) if self._train_time else "",
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})


class SaveConfig(Callback):
    """Writes the run's config.yaml once training really starts (after a resume has loaded), so a
    command that fails before then leaves the folder as it was."""

    def __init__(self, path: Path, settings: Settings) -> None:
        self.path, self.settings = path, settings

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_yaml(self.settings, self.path, provenance())


class GracefulInterrupt(Callback):
    """On SIGINT/SIGTERM: finish the current step, save a resumable `last.ckpt`, then stop.

    With several processes, they agree every `sync_every` steps (one tiny all-reduce) so all stop
    at the same step; a single process checks its flag every step at no cost.
    """

    def __init__(self, last_ckpt: Path, sync_every: int = 20) -> None:
        self.last_ckpt, self.sync_every = last_ckpt, sync_every
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not earlier: Lightning installs (and at teardown restores) its own SIGTERM handler just
        # before training starts; ours must replace it, not be captured and restored by it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self.requested is not None
        if trainer.world_size > 1:
            if (batch_idx + 1) % self.sync_every:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.save_checkpoint(self.last_ckpt)
            name = signal.Signals(self.requested).name if self.requested else "a signal on another rank"
            run_dir = self.last_ckpt.parent.parent
            raise TrainingInterrupted(
                f"stopped by {name} in epoch {trainer.current_epoch + 1} after step {trainer.global_step}; "
                f"saved {self.last_ckpt}. Continue with: fmnist fit --out {run_dir} --resume"
            )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    # Restored when training ends or fails: both come before Lightning's teardown puts back the
    # handlers it found. (A callback's `teardown` comes after it, and would leave Lightning's
    # SIGTERM handler of a finished Trainer installed: a later SIGTERM would be swallowed.)
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


# ---------------------------------------------------------------------------------------------
# Building and running


def build_datamodule(s: Settings) -> FashionMNISTDataModule:
    augment = Augment(translate=2 if s.augment else 0, hflip=s.augment, erase_p=s.random_erasing)
    return FashionMNISTDataModule(
        data_dir=s.data_dir,
        offline=s.offline,
        val_size=s.val_size,
        batch_size=s.batch_size,
        eval_batch_size=s.eval_batch_size,
        label_smoothing=s.label_smoothing,
        augment=augment,
        seed=s.seed,
    )


def build_model(s: Settings, datamodule: FashionMNISTDataModule) -> FashionClassifier:
    mean, std = datamodule.train_stats() if s.standardize else (0.0, 1.0)
    model = FashionClassifier(
        network=s.network,
        dropout=s.dropout,
        dropout_conv=s.dropout_conv,
        dropout_dense=s.dropout_dense,
        lr=s.lr,
        optimizer=s.optimizer,
        weight_decay=s.weight_decay,
        lr_schedule=s.lr_schedule,
        channels_last=s.channels_last,
        input_mean=mean,
        input_std=std,
    )
    if s.compile:
        model.net.compile()  # in place: state_dict keys stay the same as without compile
    return model


def _logger(run_dir: Path) -> Any:
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name=TENSORBOARD_DIR, version="")
    except ModuleNotFoundError:
        return False


def build_trainer(s: Settings, hw: Hardware, run_dir: Path, extra_callbacks: list[Callback] | None = None) -> L.Trainer:
    # We log per epoch only, so Lightning's hint about short epochs vs. log_every_n_steps is noise.
    warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")
    # Our data module restores the position inside the epoch itself (see its state_dict).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    ckpt_dir = run_dir / CHECKPOINT_DIR
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename=Path(BEST_CHECKPOINT).stem,  # save_last adds last.ckpt beside it
        monitor="val/acc",
        mode="max",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    callbacks: list[Callback] = [
        checkpoint,
        SaveConfig(run_dir / CONFIG, s),
        EpochMetricsCSV(run_dir / METRICS),
        GracefulInterrupt(run_dir / LAST_CHECKPOINT),
    ]
    if s.progress:
        callbacks.append(RichProgressBar(refresh_rate=10, leave=True))
    callbacks += extra_callbacks or []
    return L.Trainer(
        accelerator=hw.accelerator,
        devices=hw.devices,
        strategy=hw.strategy,
        num_nodes=hw.num_nodes,
        precision=hw.precision,  # type: ignore[arg-type]
        max_epochs=s.max_epochs,
        deterministic=s.deterministic,
        limit_train_batches=s.limit_train_batches,
        limit_val_batches=s.limit_val_batches,
        callbacks=callbacks,
        logger=_logger(run_dir),
        default_root_dir=str(run_dir),
        enable_progress_bar=s.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # our batches are sharded by the data module itself
    )


@dataclass
class FitResult:
    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_val_acc: float
    epochs: int
    wall_time_s: float
    images_per_s: float
    peak_rss_mb: float
    is_global_zero: bool


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv as floats (empty cells dropped)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def checkpoint_epoch(path: Path) -> int:
    """Epochs whose training had finished when the checkpoint was written."""
    from fmnist_lightning.evaluation import read_checkpoint

    progress = read_checkpoint(path).get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", 0))


def fit_settings(config: Path | None, overrides: dict[str, Any], out: Path | None, resume: bool) -> Settings:
    """Settings for `fit`: on --resume the run's own config.yaml is the base, unless --config is given."""
    if resume and config is None and out is not None and (out / CONFIG).is_file():
        config = out / CONFIG
    return resolve_settings(config, overrides)


def is_rank_zero_process() -> bool:
    """Whether this process is global rank 0 (under torchrun, srun, Lightning's launcher, or alone)."""
    return all(int(os.environ.get(v, "0")) == 0 for v in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


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


def run_fit(
    s: Settings,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    extra_callbacks: list[Callback] | None = None,
) -> FitResult:
    """Train as `fmnist fit` does and return where everything went. `extra_callbacks` are added
    to the Trainer (for library users and tests that want to observe training)."""
    hw = hardware_for(s)
    if resume and out is None:
        raise UsageError("--resume needs --out RUN_DIR: the run folder to continue")
    with claimed_run_dir(out) as run_dir:
        last = run_dir / LAST_CHECKPOINT
        if not is_rank_zero_process():  # rank 0 checked and prepared the folder
            return _train(s, hw, run_dir, last if resume else None, extra_callbacks)
        existed = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else None
        prepare_run_dir(run_dir, resume, overwrite)
        if resume:
            _check_resumable(s, run_dir)
        with RunLock(run_dir):
            if overwrite:
                remove_run_files(run_dir)
            try:
                return _train(s, hw, run_dir, last if resume else None, extra_callbacks)
            except BaseException:
                if not resume and not (run_dir / CONFIG).exists():
                    _remove_unstarted(run_dir, existed)
                raise


def _check_resumable(s: Settings, run_dir: Path) -> None:
    last = run_dir / LAST_CHECKPOINT
    done = checkpoint_epoch(last)
    if s.max_epochs < done:
        raise UsageError(f"--max-epochs {s.max_epochs} is below the {done} epochs {last} already trained")
    saved = run_dir / CONFIG
    planned = load_yaml(saved).get("max_epochs") if saved.is_file() else None
    if s.lr_schedule != "none" and planned is not None and planned != s.max_epochs:
        raise UsageError(
            f"this run's {s.lr_schedule} learning-rate schedule is sized for {planned} epochs; resume it with "
            f"--max-epochs {planned}, or start a new run to train longer"
        )


def _train(
    s: Settings, hw: Hardware, run_dir: Path, ckpt_path: Path | None, extra_callbacks: list[Callback] | None
) -> FitResult:
    L.seed_everything(s.seed, workers=False, verbose=False)
    datamodule = build_datamodule(s)
    model = build_model(s, datamodule)
    trainer = build_trainer(s, hw, run_dir, extra_callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    wall = time.perf_counter() - start
    rows = read_metrics(run_dir / METRICS) if trainer.is_global_zero else []
    best = max(rows, key=lambda r: r.get("val/acc", -1.0), default={})
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r]
    if trainer.is_global_zero and rows:
        from fmnist_lightning.plots import plot_curves

        plot_curves(rows, run_dir / CURVES)
    return FitResult(
        run_dir=run_dir,
        best_checkpoint=run_dir / BEST_CHECKPOINT,
        best_epoch=int(best.get("epoch", 0)),
        best_val_acc=float(best.get("val/acc", float("nan"))),
        epochs=len(rows),
        wall_time_s=wall,
        images_per_s=sum(speeds) / len(speeds) if speeds else float("nan"),
        peak_rss_mb=max((r.get("peak_rss_mb", 0.0) for r in rows), default=float("nan")),
        is_global_zero=trainer.is_global_zero,
    )
