"""`fmnist fit` as a library call: the data module, model and Trainer built from settings, and `run_fit`.

Read `run_fit` top to bottom: resolve the hardware, claim the run folder (rank 0 checks, locks and
prepares it; the other ranks use it), seed, build, fit, and summarise from `metrics.csv`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from fmnist_lightning.callbacks import EpochMetricsCSV, GracefulInterrupt, SaveConfig, SeedRanks
from fmnist_lightning.checkpoints import AtomicCheckpointIO, checkpoint_epoch
from fmnist_lightning.config import Settings, load_yaml, resolve_settings
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import UsageError
from fmnist_lightning.hardware import Hardware, hardware_for, is_global_zero
from fmnist_lightning.model import FashionClassifier
from fmnist_lightning.runs import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CONFIG,
    CURVES,
    LAST_CHECKPOINT,
    METRICS,
    claimed_run_dir,
    prepare_run_dir,
    read_metrics,
    remove_run_files,
    remove_unstarted,
    run_lock,
)
from fmnist_lightning.tracking import build_loggers, log_run_files


def build_model(s: Settings, datamodule: FashionMNISTDataModule) -> FashionClassifier:
    mean, std = datamodule.train_stats() if s.standardize else (0.0, 1.0)
    model = FashionClassifier.from_settings(s, input_mean=mean, input_std=std)
    if s.compile:
        model.net.compile()  # in place: state_dict keys stay the same as without compile
    return model


def build_trainer(s: Settings, hw: Hardware, run_dir: Path, extra_callbacks: list[Callback] | None = None) -> L.Trainer:
    # We log per epoch only, so Lightning's hint about short epochs vs. log_every_n_steps is noise.
    warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")
    # Our data module restores the position inside the epoch itself (see its state_dict).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # The validation metrics are computed from states torchmetrics sums over all ranks: every rank
    # logs the same global value, so Lightning's advice to add sync_dist does not apply.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
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
        SaveConfig(run_dir / CONFIG, s),
        EpochMetricsCSV(run_dir / METRICS),
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
    gpu_peak_mb: float | None
    is_global_zero: bool


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
    if resume and out is None:
        raise UsageError("--resume needs --out RUN_DIR: the run folder to continue")
    with claimed_run_dir(out) as run_dir:
        last = run_dir / LAST_CHECKPOINT
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
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
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
    )
