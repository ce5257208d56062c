"""How `fmnist bench` times one path: the result it records, the callback that times exactly the
asked-for training steps after the warm-up and the test epoch, and the step arithmetic all paths
share. Every path (the project's own and the baselines) is measured with these, so their figures
compare."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from fmnist_lightning.hardware import peak_rss_mb, synchronize
from fmnist_lightning.settings import TRAIN_IMAGES, BenchConfig


@dataclass
class PathResult:
    train_images_per_s: float
    warmup_s: float
    epoch_s: float  # one 55k epoch at the measured speed, warm-up included
    eval_images_per_s: float
    eval_batch_size: int
    eval_setup_s: float  # before the evaluation and excluded from its speed: the ONNX export, if any
    peak_rss_mb: float
    cuda_max_allocated_mb: float | None
    settings: dict[str, Any] = field(default_factory=dict)


class StepTimer(Callback):
    """Times exactly `cfg.steps` training steps after `cfg.warmup_steps` untimed ones, over as many
    epochs as that takes (then stops the fit), and the test epoch, with a device sync at each mark."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.warmup, self.total = cfg.warmup_steps, total_steps(cfg)
        self.start = self.warm_end = self.end = 0.0
        self.steps = 0
        self.test_start = self.test_end = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.steps == self.warmup:
            synchronize(pl_module.device)
            self.warm_end = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, idx: int
    ) -> None:
        self.steps += 1
        if self.steps == self.total:
            synchronize(pl_module.device)
            self.end = time.perf_counter()
            trainer.should_stop = True

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.test_start = time.perf_counter()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.test_end = time.perf_counter()

    def result(self, cfg: BenchConfig, eval_batch_size: int, device: torch.device) -> PathResult:
        if self.steps != self.total:  # not an assert: `python -O` would drop it, and report a wrong speed
            raise RuntimeError(f"the step timer counted {self.steps} training steps, not {self.total}")
        speed = cfg.steps * cfg.batch_size / (self.end - self.warm_end)
        return measured_result(
            speed, self.warm_end - self.start, 10000 / (self.test_end - self.test_start), eval_batch_size, device
        )


def measured_result(
    speed: float, warmup_s: float, eval_speed: float, eval_batch_size: int, device: torch.device
) -> PathResult:
    # Epoch time from the steady speed plus the measured warm-up, so quick runs need no full epoch.
    return PathResult(
        train_images_per_s=speed,
        warmup_s=warmup_s,
        epoch_s=warmup_s + TRAIN_IMAGES / speed,
        eval_images_per_s=eval_speed,
        eval_batch_size=eval_batch_size,
        eval_setup_s=0.0,
        peak_rss_mb=peak_rss_mb(),
        cuda_max_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )


def total_steps(cfg: BenchConfig) -> int:
    return cfg.warmup_steps + cfg.steps


def epochs_for(cfg: BenchConfig) -> tuple[int, int]:
    """(full batches per epoch, epochs that hold the warm-up and measured steps). Only full
    batches are trained: a partial last batch is a new shape, which `--compile` would recompile
    for inside the timed window."""
    batches = TRAIN_IMAGES // cfg.batch_size
    return batches, -(-total_steps(cfg) // batches)
