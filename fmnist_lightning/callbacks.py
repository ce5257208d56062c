"""The callbacks `fmnist fit` adds to Lightning's: per-epoch metrics, the run's config, a clean stop
on SIGINT/SIGTERM, a stop at the first non-finite loss, per-rank seeding, and SWA on Lightning's
weight averaging."""

from __future__ import annotations

import csv
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from fmnist_lightning.errors import NonFiniteLoss, TrainingInterrupted
from fmnist_lightning.hardware import cpu_name, gather_objects, peak_rss_mb, synchronize, torchrun_agent
from fmnist_lightning.runs import METRIC_COLUMNS, provenance, read_metrics
from fmnist_lightning.settings import Settings, save_yaml


def _sync(pl_module: L.LightningModule) -> None:
    synchronize(pl_module.device)  # at epoch and validation boundaries only: honest timings


class EpochMetricsCSV(Callback):
    """One row per epoch in `metrics.csv`: train and val loss/accuracy, lr and training speed.

    The training time of an epoch excludes the validation that runs inside it (at its end, or at
    `val_check_interval`): each validation's duration is subtracted. `rows` holds every epoch's
    row in memory (as floats, empty cells left out), those of a resumed run's earlier epochs too:
    the fit's summary is made from them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        self._start = self._val_start = 0.0
        self._val_time = 0.0
        self._images = 0
        self._validated = False  # this epoch (--check-val-every-n-epoch skips some)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run continues the file: its earlier epochs are part of this run's history.
        self.rows = read_metrics(self.path) if trainer.is_global_zero else []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch skips on_train_epoch_start for that epoch: time it from here.
        self._start, self._val_time, self._images = time.perf_counter(), 0.0, 0
        self._validated = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        self._start, self._val_time, self._images = time.perf_counter(), 0.0, 0
        self._validated = False
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch.labels) * trainer.world_size

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            _sync(pl_module)
            self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            _sync(pl_module)
            self._val_time += time.perf_counter() - self._val_start
            self._validated = True

    def epoch_times(self) -> tuple[float, float]:
        """(training seconds, validation seconds) of the epoch so far."""
        return time.perf_counter() - self._start - self._val_time, self._val_time

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        train_time, _ = self.epoch_times()
        # Every rank reads the metrics: computing a synced metric is a collective, and a rank that
        # skipped it would meet the others' next collective instead (a deadlock under DDP).
        callback_metrics = trainer.callback_metrics
        if not trainer.is_global_zero:
            return
        # Lightning keeps the last validation's metrics: an epoch without validation must not repeat them.
        metrics = {
            k: float(v)
            for k, v in callback_metrics.items()
            if k in METRIC_COLUMNS and (self._validated or not k.startswith("val/"))
        }
        on_gpu = pl_module.device.type == "cuda"
        row: dict[str, Any] = {
            **metrics,
            "epoch": trainer.current_epoch + 1,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train_time_s": round(train_time, 3),
            "images_per_s": round(self._images / train_time, 1) if train_time > 0 else "",
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "gpu_peak_mb": round(torch.cuda.max_memory_allocated(pl_module.device) / 2**20, 1) if on_gpu else "",
        }
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
        self.rows.append({k: float(v) for k, v in row.items() if k in METRIC_COLUMNS and v != ""})
        # TensorBoard and MLflow see only what the model logs; add what is measured here, at the
        # step Lightning gives the epoch's own metrics (that of its last optimiser step).
        measured = {k: float(row[k]) for k in ("lr", "images_per_s") if row[k] != ""}
        for logger in trainer.loggers:
            logger.log_metrics(measured, step=max(trainer.global_step - 1, 0))


def run_environment(trainer: L.Trainer) -> dict[str, Any]:
    """How this run was really executed: resolved hardware and how the processes were launched."""
    environment = getattr(trainer.strategy, "cluster_environment", None)  # only parallel strategies have one
    return {
        "cpu": cpu_name(),  # `fmnist results` names it beside the run's times
        "accelerator": type(trainer.accelerator).__name__,
        "resolved_precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "cluster_environment": type(environment).__name__ if environment is not None else None,
    }


class SaveConfig(Callback):
    """Writes the run's config.yaml once training really starts (after a resume has loaded), so a
    command that fails before then leaves the folder as it was."""

    def __init__(self, path: Path, settings: Settings, precision: str) -> None:
        self.path, self.settings, self.precision = path, settings, precision  # precision: what and why

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Under torchrun, record every node's agent: a process one of them restarts knows by this
        # that it continues this job (see training.restarted_by_launcher). Every rank takes part.
        agents = gather_objects(torchrun_agent())
        if trainer.is_global_zero:
            launched = {"torchrun_agents": sorted(set(agents))} if None not in agents else {}
            chosen = {"precision": self.precision}
            save_yaml(self.settings, self.path, {**provenance(), **run_environment(trainer), **chosen, **launched})


class SeedRanks(Callback):
    """Seed each rank's generators with seed + global rank once the process group exists.

    Weights are initialised before this from the common seed (and DDP broadcasts rank 0's anyway);
    what follows, dropout above all, must differ between ranks, or every rank draws the same
    masks. `setup` runs before a checkpoint's RNG states are restored, so a resume still continues
    each rank's own stream.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            torch.manual_seed(self.seed + trainer.global_rank)


class GracefulInterrupt(Callback):
    """On SIGINT/SIGTERM: finish the current step, save a resumable `last.ckpt`, then stop.

    A single process checks its flag after every step at no cost. Several processes must stop at
    the same step, so they agree (one tiny all-reduce) every `sync_every` optimiser steps, keyed on
    `global_step` (the same on every rank), and at the start of every epoch: an epoch shorter than
    `sync_every` steps (8 GPUs at batch 512 give 13) still stops, at its end.
    """

    def __init__(self, last_ckpt: Path, sync_every: int = 20) -> None:
        self.last_ckpt, self.sync_every = last_ckpt, sync_every
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}
        self._checked_step = -1

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not earlier: Lightning installs (and at teardown restores) its own SIGTERM handler just
        # before training starts; ours must replace it, not be captured and restored by it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _check(self, trainer: L.Trainer) -> None:
        stop = self.requested is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        trainer.save_checkpoint(self.last_ckpt)
        name = signal.Signals(self.requested).name if self.requested else "a signal on another rank"
        run_dir = self.last_ckpt.parent.parent
        raise TrainingInterrupted(
            f"stopped by {name} in epoch {trainer.current_epoch + 1} after step {trainer.global_step}; "
            f"saved {self.last_ckpt}. Continue with: fmnist fit --out {shlex.quote(str(run_dir))} --resume"
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Only after a batch that ended an optimiser step: with --accumulate-grad-batches, the
        # gradients summed so far are not in a checkpoint, so stopping inside a group would lose them.
        if step == self._checked_step or (trainer.world_size > 1 and step % self.sync_every):
            return
        self._checked_step = step
        self._check(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

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


class FiniteLossGuard(Callback):
    """Stop at the first NaN or infinite training loss, before any checkpoint holds broken weights.

    Reading the loss on the host at every step would make a GPU wait for each step to finish (a
    sync that empties its queue). So each step only ORs its verdict into tensors on the device: the
    step of the first non-finite loss, -1 while there is none. They are read back every
    `check_every` optimiser steps, before each validation, at the end of each epoch, and before
    any checkpoint is written: a save never runs unchecked, so the last.ckpt on disk is from
    before the loss broke.
    """

    def __init__(self, last_ckpt: Path, check_every: int = 50) -> None:
        self.last_ckpt, self.check_every = last_ckpt, check_every
        self._first_bad: torch.Tensor | None = None
        self._checked_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where((self._first_bad < 0) & bad, trainer.global_step, self._first_bad)
        step = trainer.global_step
        if step % self.check_every == 0 and step != self._checked_step:  # global_step: the same on every rank
            self._checked_step = step
            self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        first = int(self._first_bad.item()) if self._first_bad is not None else -1
        broken = first >= 0
        if trainer.world_size > 1:  # every rank calls this at the same point; all must stop together
            broken = trainer.strategy.reduce_boolean_decision(broken, all=False)
        if not broken:
            return
        where = f"at step {first}" if first >= 0 else "on another rank"
        kept = (
            f"the last good checkpoint {self.last_ckpt} was kept (saved before it)"
            if self.last_ckpt.is_file()
            else "no checkpoint had been saved yet"
        )
        raise NonFiniteLoss(
            f"training loss became NaN or infinite in epoch {trainer.current_epoch + 1} {where}; stopped. Try a "
            f"lower --lr (this run's: {trainer.lightning_module.hparams['lr']:g}) or gradient clipping "
            f"(--gradient-clip-val 1.0); {kept}"
        )


class StochasticWeightAverage(WeightAveraging):
    """SWA on Lightning's WeightAveraging: the equal average of the weights after every optimiser
    step from `start` (a fraction of all steps) on.

    Until then the "average" follows the weights: validations and checkpoints before the averaging
    starts show the trained weights, not the initial ones that WeightAveraging would otherwise hold.
    (Lightning's StochasticWeightAveraging callback validates and checkpoints the raw weights, and
    changes the learning rate; this keeps the schedule and uses the average everywhere.) The count
    of averaged steps is the AveragedModel's own `n_averaged`, so a resumed run continues the same
    average. Everything stays on the device: no host sync.
    """

    def __init__(self, start: float) -> None:
        super().__init__(avg_fn=self._average)
        self.start = start
        self.start_step = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # At least 1: the average cannot include weights from before the first step.
        self.start_step = max(1, int(self.start * trainer.estimated_stepping_batches))

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        # num_averaged = optimiser steps before this one (the first step's weights are copied).
        # From start_step on, this is the running mean of the weights of steps start_step, ..., now.
        weight = 1 / (num_averaged - self.start_step + 2).clamp(min=1)
        return torch.where(num_averaged < self.start_step, current, averaged + (current - averaged) * weight)
