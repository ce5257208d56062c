"""`fmnist lr-find`: Lightning's learning-rate range test, on the network, data and settings that
`fmnist fit` would use, and the `fmnist fit` line that trains with its suggestion."""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
from lightning.pytorch.tuner import Tuner, lr_finder

from fmnist_lightning.callbacks import SeedRanks
from fmnist_lightning.errors import FmnistError, UsageError
from fmnist_lightning.hardware import resolve_hardware
from fmnist_lightning.runs import check_output_dir
from fmnist_lightning.settings import Settings, option_name
from fmnist_lightning.trainer_factory import known_warnings_hidden, loop_options, make_trainer
from fmnist_lightning.training import build_datamodule, build_model

LR_FIND_PLOT = "lr_find.png"


@dataclass
class LrFindResult:
    suggestion: float
    plot: Path
    steps: int  # the range test stops early once the loss diverges


def run_lr_find(s: Settings, out: Path, steps: int = 100, min_lr: float = 1e-8, max_lr: float = 1.0) -> LrFindResult:
    """Train `steps` optimiser steps with the learning rate growing exponentially from `min_lr` to
    `max_lr`, write the loss against it to `out`/lr_find.png and return Lightning's suggestion
    (the steepest descent of the smoothed loss)."""
    if s.run.fast_dev_run:
        raise UsageError("--fast-dev-run runs one batch; the learning-rate finder needs --steps of them")
    if not 0 < min_lr < max_lr:
        raise UsageError(f"--min-lr {min_lr:g} must be positive and below --max-lr {max_lr:g}")
    check_output_dir(out)
    hw = resolve_hardware(s.hardware)
    L.seed_everything(s.run.seed, workers=False, verbose=False)
    datamodule = build_datamodule(s)
    model = build_model(s, datamodule)
    with tempfile.TemporaryDirectory(prefix="fmnist-lr-find-") as tmp:  # Lightning's own save-and-restore
        # What shapes the loss along the way, as in `fit`; the range test replaces the schedule itself.
        options = {
            **loop_options(s.run, s.toolkit),
            "max_steps": steps,  # also sizes the schedule that configure_optimizers builds (and the finder replaces)
            "max_epochs": -1,
        }
        trainer = make_trainer(
            hw,
            **options,
            callbacks=[SeedRanks(s.run.seed)],
            enable_checkpointing=False,
            default_root_dir=tmp,
            progress=s.run.progress,
        )
        # The range test draws its own tqdm bar, whatever the Trainer's progress setting.
        bar: AbstractContextManager[Any] = (
            nullcontext()
            if s.run.progress
            else mock.patch.object(lr_finder, "tqdm", partial(lr_finder.tqdm, disable=True))
        )
        with bar, known_warnings_hidden():
            finder = Tuner(trainer).lr_find(
                model, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr, num_training=steps
            )
    assert finder is not None  # None only under fast_dev_run, refused above
    lrs, losses = finder.results["lr"], finder.results["loss"]
    # Lightning skips the first 10 points by default: the smoothed loss is still biased low there
    # (its bias correction is one step ahead). A short test has fewer to spare. The plot shows the
    # points the suggestion considers.
    skip = min(10, len(lrs) // 10)
    suggestion = finder.suggestion(skip_begin=skip, skip_end=1)
    if trainer.is_global_zero:
        from fmnist_lightning.plots import plot_lr_find

        plot_lr_find(lrs[skip:-1], losses[skip:-1], suggestion, out / LR_FIND_PLOT)
    if suggestion is None:
        raise FmnistError(
            f"no learning rate to suggest: {len(lrs)} points are too few or the loss never fell (see "
            f"{out / LR_FIND_PLOT}); try more --steps or another --min-lr/--max-lr"
        )
    return LrFindResult(suggestion=float(suggestion), plot=out / LR_FIND_PLOT, steps=len(lrs))


def fit_command(config: Path | None, given: Mapping[str, Any], lr: float) -> str:
    """The `fmnist fit` line with the same settings as the range test, and the suggested rate."""
    parts = ["fmnist", "fit"]
    if config is not None:
        parts += ["--config", str(config)]
    for name, value in given.items():
        if name == "lr":
            continue
        if isinstance(value, bool):
            parts.append(option_name(name) if value else f"--no-{option_name(name)[2:]}")
        else:
            parts += [option_name(name), str(value)]
    return shlex.join([*parts, "--lr", format_lr(lr)])


def format_lr(lr: float) -> str:
    return f"{lr:.3g}"
