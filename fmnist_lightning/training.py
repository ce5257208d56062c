"""`fmnist fit` as a library call: the data module, model and Trainer built from settings, and `run_fit`.

Read `run_fit` top to bottom: resolve the hardware, claim the run folder (rank 0 checks, locks and
prepares it; the other ranks use it), seed, build, fit, and summarise from the metrics callback's rows.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from fmnist_lightning.callbacks import (
    EpochMetricsCSV,
    FiniteLossGuard,
    GracefulInterrupt,
    SaveConfig,
    SeedRanks,
    StochasticWeightAverage,
)
from fmnist_lightning.checkpoints import checkpoint_epoch
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import UsageError
from fmnist_lightning.hardware import (
    EMULATED_BF16,
    Hardware,
    is_global_zero,
    launcher_restarts,
    resolve_hardware,
    torchrun_agent,
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
    best_row,
    claimed_run_dir,
    newest_checkpoint,
    prepare_run_dir,
    profile_reports,
    remove_run_files,
    remove_unstarted,
    run_lock,
    time_to_val_acc,
)
from fmnist_lightning.settings import Settings, ToolkitSettings, load_yaml, read_config
from fmnist_lightning.tracking import build_loggers, log_run_files
from fmnist_lightning.trainer_factory import known_warnings_hidden, loop_options, make_trainer

log = logging.getLogger(__name__)
NO_PATIENCE_LIMIT = 2**31  # an EarlyStopping that stops at its threshold only


def build_datamodule(s: Settings) -> FashionMNISTDataModule:
    return FashionMNISTDataModule.from_settings(
        s.data, s.evaluation.eval_batch_size, s.optimisation.batch_size, s.augmentation, s.run.seed
    )


def build_model(s: Settings, datamodule: FashionMNISTDataModule) -> FashionClassifier:
    mean, std = datamodule.train_stats() if s.model.standardize else (0.0, 1.0)
    model = FashionClassifier.from_settings(s.model, s.optimisation, input_mean=mean, input_std=std)
    if s.model.compile:
        model.net.compile()  # in place: state_dict keys stay the same as without compile
    return model


def _profiler(kind: str, run_dir: Path) -> object:
    """Lightning's profiler of that kind, writing its report into the run folder (None: off)."""
    from lightning.pytorch import profilers

    classes = {
        "simple": profilers.SimpleProfiler,
        "advanced": profilers.AdvancedProfiler,
        "pytorch": profilers.PyTorchProfiler,
    }
    return classes[kind](dirpath=run_dir, filename=PROFILE) if kind in classes else None


def training_callbacks(t: ToolkitSettings, run_dir: Path) -> list[Callback]:
    """The callbacks that the toolkit switches on: weight averaging, early stopping, and the loss guard."""
    callbacks: list[Callback] = []
    # Before the checkpoint callback (Lightning moves ModelCheckpoint last anyway): validation and
    # every checkpoint then see the averaged weights.
    if t.weight_averaging == "ema":
        callbacks.append(EMAWeightAveraging(decay=t.ema_decay))
    elif t.weight_averaging == "swa":
        callbacks.append(StochasticWeightAverage(t.swa_start))
    callbacks += early_stopping(t)
    callbacks.append(FiniteLossGuard(run_dir / LAST_CHECKPOINT))
    return callbacks


def early_stopping(t: ToolkitSettings) -> list[Callback]:
    """Lightning's EarlyStopping for --early-stopping-patience, and for --stop-at-val-acc (its
    `stopping_threshold`). Both on val/acc share one callback: Lightning keys a callback's saved
    state by monitor and mode, so two alike could not both be in a checkpoint."""
    shared = t.stop_at_val_acc > 0 and t.early_stopping_patience > 0 and t.early_stopping_monitor == "val/acc"
    stoppers: list[Callback] = []
    if t.stop_at_val_acc:
        stoppers.append(
            EarlyStopping(
                monitor="val/acc",
                mode="max",
                stopping_threshold=t.stop_at_val_acc,
                patience=t.early_stopping_patience if shared else NO_PATIENCE_LIMIT,
                min_delta=t.early_stopping_min_delta,
            )
        )
    if t.early_stopping_patience and not shared:
        stoppers.append(
            EarlyStopping(
                monitor=t.early_stopping_monitor,
                mode="max" if t.early_stopping_monitor == "val/acc" else "min",
                patience=t.early_stopping_patience,
                min_delta=t.early_stopping_min_delta,
            )
        )
    return stoppers


def build_trainer(
    s: Settings,
    hw: Hardware,
    run_dir: Path,
    extra_callbacks: list[Callback] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """The Trainer of `fmnist fit`: the settings' loop options and the callbacks that write the run
    folder. `overrides` replace Trainer arguments (the benchmark turns validation off)."""
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
        SeedRanks(s.run.seed),
        checkpoint,
        *_periodic_last(s.run.checkpoint_every_n_steps, run_dir),
        SaveConfig(run_dir / CONFIG, s, hw.precision_described),
        EpochMetricsCSV(run_dir / METRICS),
        # Before GracefulInterrupt: a step's update of the averaged weights must be in the
        # checkpoint that a signal saves at the end of that step.
        *training_callbacks(s.toolkit, run_dir),
        GracefulInterrupt(run_dir / LAST_CHECKPOINT),
    ]
    if s.run.progress:
        callbacks.append(RichProgressBar(refresh_rate=10, leave=True))
    callbacks += extra_callbacks or []
    options = {
        **loop_options(s.run, s.toolkit),
        "callbacks": callbacks,
        "logger": build_loggers(s.tracking, run_dir, s.flat()),
        "default_root_dir": str(run_dir),
        "profiler": _profiler(s.run.profiler, run_dir),
    }
    return make_trainer(hw, progress=s.run.progress, **{**options, **overrides})


def _periodic_last(every_n_steps: int, run_dir: Path) -> list[Callback]:
    """Lightning's ModelCheckpoint saving only last.ckpt, every `every_n_steps` steps (mid-epoch
    checkpoints resume exactly: the data module records the position in the epoch)."""
    if not every_n_steps:
        return []
    return [
        ModelCheckpoint(
            dirpath=run_dir / CHECKPOINT_DIR,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_steps,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
    ]


@dataclass
class FitResult:
    run_dir: Path
    best_checkpoint: Path
    precision: str  # what it trained in, and why (e.g. "bf16-mixed (the CPU has avx512_bf16)")
    best_epoch: int
    best_val_acc: float
    epochs: int
    wall_time_s: float
    images_per_s: float
    peak_rss_mb: float
    gpu_peak_mb: float | None
    is_global_zero: bool
    stopped_early_after: int | None = None  # epochs, when early stopping ended the run
    stop_reason: str = ""  # why it stopped early
    target_reached: tuple[int, float] | None = None  # --stop-at-val-acc's (epoch, training seconds) to it
    profiles: tuple[Path, ...] = ()  # the profiler's reports
    fast_dev_run: bool = False  # a smoke test: nothing was kept
    history: list[dict[str, float]] = field(default_factory=list)  # metrics.csv's rows (rank 0)


def run_fit(
    s: Settings,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    extra_callbacks: list[Callback] | None = None,
) -> FitResult:
    """Train as `fmnist fit` does and return where everything went. `extra_callbacks` are added
    to the Trainer (for library users and tests that want to observe training)."""
    hw = resolve_hardware(s.hardware)
    if EMULATED_BF16 in hw.precision_why and is_global_zero():
        log.warning("precision bf16-mixed: %s", EMULATED_BF16)
    if s.run.fast_dev_run:
        if out is not None or resume or overwrite:
            raise UsageError("--fast-dev-run keeps no files; drop --out, --resume and --overwrite")
        # Lightning's fast_dev_run writes no checkpoints or logs, but our callbacks write files:
        # they go into a temporary folder, removed afterwards.
        with tempfile.TemporaryDirectory(prefix="fmnist-fast-dev-run-") as tmp:
            return _train(s, hw, Path(tmp), None, extra_callbacks)
    if resume and out is None:
        raise UsageError("--resume needs --out RUN_DIR: the run folder to continue")
    with claimed_run_dir(out) as run_dir:
        # A job its launcher restarted (torchrun --max-restarts, a requeued SLURM job) continues
        # from the run's newest checkpoint by itself: nobody is there to type --resume. Killed
        # before its first checkpoint, it starts the run again (its files hold nothing to continue).
        restarted = restarted_by_launcher(run_dir) and not overwrite
        restored = newest_checkpoint(run_dir) if restarted else None
        if restarted and is_global_zero():
            count = launcher_restarts()
            restart = f"restart {count} of this job" if count else "this job's torchrun agent started it again"
            what = f"resuming from {restored}" if restored else "no checkpoint yet, starting again"
            log.info("%s: %s", restart, what)
        overwrite = overwrite or (restarted and restored is None and not resume)
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
        recorded = read_config(run_dir / CONFIG)[1].get("torchrun_agents") or []
    except UsageError:
        return False
    return agent in recorded


def _check_resumable(s: Settings, run_dir: Path) -> None:
    last = run_dir / LAST_CHECKPOINT
    done = checkpoint_epoch(last)
    max_epochs, schedule = s.run.max_epochs, s.optimisation.lr_schedule
    if max_epochs < done:
        raise UsageError(f"--max-epochs {max_epochs} is below the {done} epochs {last} already trained")
    saved = run_dir / CONFIG
    planned = load_yaml(saved).get("max_epochs") if saved.is_file() else None
    if schedule != "none" and planned is not None and planned != max_epochs:
        raise UsageError(
            f"this run's {schedule} learning-rate schedule is sized for {planned} epochs; resume it with "
            f"--max-epochs {planned}, or start a new run to train longer"
        )


def _train(
    s: Settings, hw: Hardware, run_dir: Path, ckpt_path: Path | None, extra_callbacks: list[Callback] | None
) -> FitResult:
    L.seed_everything(s.run.seed, workers=False, verbose=False)  # the same initial weights on every rank
    datamodule = build_datamodule(s)
    model = build_model(s, datamodule)
    trainer = build_trainer(s, hw, run_dir, extra_callbacks)
    start = time.perf_counter()
    try:
        with known_warnings_hidden():
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
            if s.run.fast_dev_run:  # one batch of the test split too
                trainer.test(model, datamodule=datamodule, verbose=False)
    except ValueError as exc:
        if "`val_check_interval`" not in str(exc):  # Lightning can only check this once it has the data
            raise
        raise UsageError(
            f"--val-check-interval {s.run.val_check_interval} is more batches than an epoch has; give a fraction "
            "(0.5) or a smaller count"
        ) from None
    wall = time.perf_counter() - start
    stopped_after, stop_reason = _early_stop(trainer)
    rows = next(c for c in trainer.callbacks if isinstance(c, EpochMetricsCSV)).rows  # type: ignore[attr-defined]
    best = best_row(rows)
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r]
    gpu = [r["gpu_peak_mb"] for r in rows if "gpu_peak_mb" in r]
    if trainer.is_global_zero and rows:
        from fmnist_lightning.plots import plot_curves

        plot_curves(rows, run_dir / CURVES)
        log_run_files(run_dir, (run_dir / CONFIG, run_dir / CURVES))
    return FitResult(
        run_dir=run_dir,
        best_checkpoint=run_dir / BEST_CHECKPOINT,
        precision=hw.precision_described,
        best_epoch=int(best.get("epoch", 0)),
        best_val_acc=float(best.get("val/acc", float("nan"))),
        epochs=len(rows),
        wall_time_s=wall,
        images_per_s=sum(speeds) / len(speeds) if speeds else float("nan"),
        peak_rss_mb=max((r.get("peak_rss_mb", 0.0) for r in rows), default=float("nan")),
        gpu_peak_mb=max(gpu) if gpu else None,
        is_global_zero=trainer.is_global_zero,
        stopped_early_after=stopped_after,
        stop_reason=stop_reason,
        target_reached=time_to_val_acc(rows, s.toolkit.stop_at_val_acc) if s.toolkit.stop_at_val_acc else None,
        profiles=profile_reports(run_dir),
        fast_dev_run=s.run.fast_dev_run,
        history=rows,
    )


def _early_stop(trainer: L.Trainer) -> tuple[int | None, str]:
    """(epochs trained, why) when an EarlyStopping ended the run before --max-epochs, else (None, "")."""
    for stopper in trainer.callbacks:  # type: ignore[attr-defined]
        if not isinstance(stopper, EarlyStopping) or stopper.stopping_reason == EarlyStoppingReason.NOT_STOPPED:
            continue
        if trainer.current_epoch >= (trainer.max_epochs or 0):
            break
        if stopper.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD:
            why = f"{stopper.monitor} reached {stopper.stopping_threshold:g} (--stop-at-val-acc)"
        elif stopper.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            why = "the monitored metric stopped improving"
        else:
            why = stopper.stopping_reason_message or str(stopper.stopping_reason.value)
        return trainer.current_epoch, why
    return None, ""
