"""`fmnist fit` as a library call: the data module, model and Trainer built from settings, and `run_fit`.

Read `run_fit` top to bottom: resolve the hardware, claim the run folder (rank 0 checks, locks and
prepares it; the other ranks use it), seed, build, fit, and summarise from `metrics.csv`.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint, RichProgressBar

from fmnist_lightning.callbacks import (
    EpochMetricsCSV,
    FiniteLossGuard,
    GracefulInterrupt,
    SaveConfig,
    SeedRanks,
    StochasticWeightAverage,
)
from fmnist_lightning.checkpoints import AtomicCheckpointIO, checkpoint_epoch
from fmnist_lightning.config import Settings
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import UsageError
from fmnist_lightning.hardware import (
    Hardware,
    hardware_for,
    is_global_zero,
    launcher_restarts,
    torchrun_agent,
    torchrun_restart_warning,
)
from fmnist_lightning.model import FashionClassifier
from fmnist_lightning.runs import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CONFIG,
    CURVES,
    LAST_CHECKPOINT,
    METRICS,
    PROFILE,
    claimed_run_dir,
    newest_checkpoint,
    prepare_run_dir,
    profile_reports,
    read_metrics,
    remove_run_files,
    remove_unstarted,
    run_lock,
)
from fmnist_lightning.settings import PROVENANCE_KEY, load_yaml, resolve_settings
from fmnist_lightning.tracking import build_loggers, log_run_files

log = logging.getLogger(__name__)


def build_model(s: Settings, datamodule: FashionMNISTDataModule) -> FashionClassifier:
    mean, std = datamodule.train_stats() if s.standardize else (0.0, 1.0)
    model = FashionClassifier.from_settings(s, input_mean=mean, input_std=std)
    if s.compile:
        model.net.compile()  # in place: state_dict keys stay the same as without compile
    return model


def trainer_options(s: Settings, run_dir: Path) -> dict[str, Any]:
    """The Trainer arguments that settings map onto one to one."""
    return dict(
        gradient_clip_val=s.gradient_clip_val or None,  # 0 means off, which Lightning spells None
        gradient_clip_algorithm=s.gradient_clip_algorithm,
        accumulate_grad_batches=s.accumulate_grad_batches,
        val_check_interval=s.val_check_interval,
        check_val_every_n_epoch=s.check_val_every_n_epoch,
        fast_dev_run=s.fast_dev_run,
        overfit_batches=s.overfit_batches,
        profiler=_profiler(s.profiler, run_dir),
    )


def _profiler(kind: str, run_dir: Path) -> object:
    """Lightning's profiler of that kind, writing its report into the run folder (None: off)."""
    from lightning.pytorch import profilers

    classes = {
        "simple": profilers.SimpleProfiler,
        "advanced": profilers.AdvancedProfiler,
        "pytorch": profilers.PyTorchProfiler,
    }
    return classes[kind](dirpath=run_dir, filename=PROFILE) if kind in classes else None


def training_callbacks(s: Settings, run_dir: Path) -> list[Callback]:
    """The callbacks that settings switch on: weight averaging, early stopping, and the loss guard."""
    callbacks: list[Callback] = []
    # Before the checkpoint callback (Lightning moves ModelCheckpoint last anyway): validation and
    # every checkpoint then see the averaged weights.
    if s.weight_averaging == "ema":
        callbacks.append(EMAWeightAveraging(decay=s.ema_decay))
    elif s.weight_averaging == "swa":
        callbacks.append(StochasticWeightAverage(s.swa_start))
    if s.early_stopping_patience:
        callbacks.append(
            EarlyStopping(
                monitor=s.early_stopping_monitor,
                mode="max" if s.early_stopping_monitor == "val/acc" else "min",
                patience=s.early_stopping_patience,
                min_delta=s.early_stopping_min_delta,
            )
        )
    callbacks.append(FiniteLossGuard(run_dir / LAST_CHECKPOINT))
    return callbacks


def build_trainer(s: Settings, hw: Hardware, run_dir: Path, extra_callbacks: list[Callback] | None = None) -> L.Trainer:
    # We log per epoch only, so Lightning's hint about short epochs vs. log_every_n_steps is noise.
    warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")
    # Our data module restores the position inside the epoch itself (see its state_dict).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # The validation metrics are computed from states torchmetrics sums over all ranks: every rank
    # logs the same global value, so Lightning's advice to add sync_dist does not apply.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
    # Under --overfit-batches the data module itself stops shuffling (Lightning cannot, for a loader
    # that is not a DataLoader; evaluation never shuffles), so Lightning's warning is wrong.
    warnings.filterwarnings("ignore", message="You requested to overfit but enabled")
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename=Path(BEST_CHECKPOINT).stem,  # save_last adds last.ckpt beside it
        monitor="val/acc",
        mode="max",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    callbacks: list[Callback] = [
        SeedRanks(s.seed),
        checkpoint,
        *_periodic_last(s, run_dir),
        SaveConfig(run_dir / CONFIG, s),
        EpochMetricsCSV(run_dir / METRICS),
        # Before GracefulInterrupt: a step's update of the averaged weights must be in the
        # checkpoint that a signal saves at the end of that step.
        *training_callbacks(s, run_dir),
        GracefulInterrupt(run_dir / LAST_CHECKPOINT),
    ]
    if s.progress:
        callbacks.append(RichProgressBar(refresh_rate=10, leave=True))
    callbacks += extra_callbacks or []
    return L.Trainer(
        **hw.trainer_kwargs(),
        max_epochs=s.max_epochs,
        deterministic=s.deterministic,
        limit_train_batches=s.limit_train_batches,
        limit_val_batches=s.limit_val_batches,
        callbacks=callbacks,
        logger=build_loggers(s, run_dir),
        default_root_dir=str(run_dir),
        enable_progress_bar=s.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # our batches are sharded by the data module itself
        **trainer_options(s, run_dir),
    )


def _periodic_last(s: Settings, run_dir: Path) -> list[Callback]:
    """Lightning's ModelCheckpoint saving only last.ckpt, every `checkpoint_every_n_steps` steps
    (mid-epoch checkpoints resume exactly: the data module records the position in the epoch)."""
    if not s.checkpoint_every_n_steps:
        return []
    return [
        ModelCheckpoint(
            dirpath=run_dir / CHECKPOINT_DIR,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=s.checkpoint_every_n_steps,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
    ]


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
    gpu_peak_mb: float | None
    is_global_zero: bool
    stopped_early_after: int | None = None  # epochs, when early stopping ended the run
    profiles: tuple[Path, ...] = ()  # the profiler's reports
    fast_dev_run: bool = False  # a smoke test: nothing was kept


def fit_settings(config: Path | None, overrides: dict[str, object], out: Path | None, resume: bool) -> Settings:
    """Settings for `fit`: on --resume the run's own config.yaml is the base, unless --config is given."""
    if resume and config is None and out is not None and (out / CONFIG).is_file():
        config = out / CONFIG
    return resolve_settings(config, overrides)


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
    if s.fast_dev_run:
        if out is not None or resume or overwrite:
            raise UsageError("--fast-dev-run keeps no files; drop --out, --resume and --overwrite")
        # Lightning's fast_dev_run writes no checkpoints or logs, but our callbacks write files:
        # they go into a temporary folder, removed afterwards.
        with tempfile.TemporaryDirectory(prefix="fmnist-fast-dev-run-") as tmp:
            return _train(s, hw, Path(tmp), None, extra_callbacks)
    if resume and out is None:
        raise UsageError("--resume needs --out RUN_DIR: the run folder to continue")
    if is_global_zero() and (warning := torchrun_restart_warning()):
        log.warning(warning)
    with claimed_run_dir(out) as run_dir:
        # A job its launcher restarted (torchrun --max-restarts, a requeued SLURM job) continues
        # from the run's newest checkpoint by itself: nobody is there to type --resume.
        restored = newest_checkpoint(run_dir) if restarted_by_launcher(run_dir) and not overwrite else None
        if restored is not None and is_global_zero():
            count = launcher_restarts()
            restart = f"restart {count} of this job" if count else "this job's torchrun agent started it again"
            log.info("%s: resuming from %s", restart, restored)
        resume = resume or restored is not None
        last = restored or run_dir / LAST_CHECKPOINT
        if not is_global_zero():  # rank 0 checked and prepared the folder
            return _train(s, hw, run_dir, last if resume else None, extra_callbacks)
        existed = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else None
        prepare_run_dir(run_dir, resume, overwrite)
        if resume:
            _check_resumable(s, run_dir)
        with run_lock(run_dir):
            if overwrite:
                remove_run_files(run_dir)
            try:
                return _train(s, hw, run_dir, last if resume else None, extra_callbacks)
            except BaseException:
                if not resume and not (run_dir / CONFIG).exists():
                    remove_unstarted(run_dir, existed)
                raise


def restarted_by_launcher(run_dir: Path) -> bool:
    """Whether this process was started again for the job `run_dir` holds: its launcher's restart
    count says so (torchrun --max-restarts, a requeued SLURM job), or, under torchrun, its agent is
    one the run recorded in config.yaml. The count alone is not enough on several nodes: an agent
    that restarts its still-running workers because another node's failed (a re-rendezvous) does
    not count that as a restart, so its workers see the count of the first start."""
    if launcher_restarts():
        return True
    agent = torchrun_agent()
    if agent is None or not (run_dir / CONFIG).is_file():
        return False
    try:
        recorded = yaml.safe_load((run_dir / CONFIG).read_text())[PROVENANCE_KEY]["torchrun_agents"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False
    return agent in recorded


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
    L.seed_everything(s.seed, workers=False, verbose=False)  # the same initial weights on every rank
    datamodule = FashionMNISTDataModule.from_settings(s)
    model = build_model(s, datamodule)
    trainer = build_trainer(s, hw, run_dir, extra_callbacks)
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except ValueError as exc:
        if "`val_check_interval`" not in str(exc):  # Lightning can only check this once it has the data
            raise
        raise UsageError(
            f"--val-check-interval {s.val_check_interval} is more batches than an epoch has; give a fraction "
            "(0.5) or a smaller count"
        ) from None
    if s.fast_dev_run:  # one batch of the test split too
        trainer.test(model, datamodule=datamodule, verbose=False)
    wall = time.perf_counter() - start
    rows = read_metrics(run_dir / METRICS) if trainer.is_global_zero else []
    best = max(rows, key=lambda r: r.get("val/acc", -1.0), default={})
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r]
    gpu = [r["gpu_peak_mb"] for r in rows if "gpu_peak_mb" in r]
    if trainer.is_global_zero and rows:
        from fmnist_lightning.plots import plot_curves

        plot_curves(rows, run_dir / CURVES)
        log_run_files(run_dir, (run_dir / CONFIG, run_dir / CURVES))
    return FitResult(
        run_dir=run_dir,
        best_checkpoint=run_dir / BEST_CHECKPOINT,
        best_epoch=int(best.get("epoch", 0)),
        best_val_acc=float(best.get("val/acc", float("nan"))),
        epochs=len(rows),
        wall_time_s=wall,
        images_per_s=sum(speeds) / len(speeds) if speeds else float("nan"),
        peak_rss_mb=max((r.get("peak_rss_mb", 0.0) for r in rows), default=float("nan")),
        gpu_peak_mb=max(gpu) if gpu else None,
        is_global_zero=trainer.is_global_zero,
        stopped_early_after=_stopped_early_after(trainer),
        profiles=profile_reports(run_dir),
        fast_dev_run=s.fast_dev_run,
    )


def _stopped_early_after(trainer: L.Trainer) -> int | None:
    """Epochs trained when early stopping ended the run before --max-epochs, else None.
    (EarlyStopping's own `stopped_epoch` is 0 both when it never stopped and when it stopped in
    the first epoch.)"""
    stopper = trainer.early_stopping_callback
    stopped = stopper is not None and stopper.wait_count >= stopper.patience
    return trainer.current_epoch if stopped and trainer.current_epoch < (trainer.max_epochs or 0) else None
