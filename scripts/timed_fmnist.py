"""`fmnist ARGS...` as the CLI runs it, with one more callback on every Trainer it builds, which times
the steps: what scripts/side_by_side.py measures `fmnist fit` and `fmnist test` with.

    python scripts/timed_fmnist.py --timing timing.json --skip-steps 10 fit --max-epochs 3 --out runs/x

Every Trainer of the tool comes from `trainer_factory.make_trainer`; this script wraps that function
before the CLI imports the modules that call it, so the command runs unchanged apart from the callback.
When the command ends, --timing gets, per training epoch, its steady-state steps (from the start of
step skip + 1 to the end of the epoch's last step: validation comes after and is left out, as in
scripts/keras_anchor.py), and per test pass its images and seconds (from its first batch to its
end, the metrics over all images included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from fmnist_lightning import trainer_factory
from fmnist_lightning.hardware import synchronize


class Timings(Callback):
    def __init__(self, skip_steps: int) -> None:
        self.skip = skip_steps
        self.train_epochs: list[dict[str, float]] = []
        self.tests: list[dict[str, float]] = []
        self.start = self.last_end = 0.0
        self.images = 0

    def _now(self, pl_module: L.LightningModule) -> float:
        synchronize(pl_module.device)  # a no-op on the CPU; on a GPU the step's work must be done
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.images = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.skip:
            self.start = self._now(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx >= self.skip:
            self.last_end = self._now(pl_module)
            self.images += len(batch.labels)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.images:
            self.train_epochs.append(
                {
                    "epoch": trainer.current_epoch + 1,
                    "steady_images": self.images,
                    "steady_time_s": self.last_end - self.start,
                }
            )

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.images = self._now(pl_module), 0

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.images += len(batch.labels)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's on_test_epoch_end: its metrics over all images count, as Keras's do.
        self.tests.append({"images": self.images, "time_s": self._now(pl_module) - self.start})

    def summary(self) -> dict[str, Any]:
        return {"skip_steps": self.skip, "train_epochs": self.train_epochs, "tests": self.tests}


def timed_trainers(timings: Timings) -> None:
    """From now on every Trainer the tool builds carries `timings` too."""
    make_trainer = trainer_factory.make_trainer

    def with_timings(*args: Any, **options: Any) -> L.Trainer:
        options["callbacks"] = [*options.get("callbacks", []), timings]
        return make_trainer(*args, **options)

    trainer_factory.make_trainer = with_timings


def main() -> None:
    parser = argparse.ArgumentParser(description="Run an fmnist command with its steps timed.")
    parser.add_argument("--timing", type=Path, required=True, help="Write the timings here (JSON).")
    parser.add_argument("--skip-steps", type=int, default=10, help="Steps at each epoch's start left out.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The fmnist command and its options.")
    args = parser.parse_args()
    timings = Timings(args.skip_steps)
    timed_trainers(timings)
    from fmnist_lightning.cli import main as fmnist  # after the wrap: the modules it loads see it

    sys.argv = ["fmnist", *args.command]
    try:
        fmnist()
    finally:
        args.timing.write_text(json.dumps(timings.summary(), indent=2) + "\n")


if __name__ == "__main__":
    main()
