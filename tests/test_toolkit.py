"""Training tricks (issue 16): each setting reaches Lightning's own callback or Trainer argument;
early stopping, weight averaging, the smoke test, the profiler and the non-finite-loss guard work
on real data."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging
from lightning.pytorch.profilers import PyTorchProfiler, SimpleProfiler

from fmnist_lightning.callbacks import FiniteLossGuard, StochasticWeightAverage
from fmnist_lightning.checkpoints import load_classifier
from fmnist_lightning.errors import NonFiniteLoss
from fmnist_lightning.hardware import resolve_hardware
from fmnist_lightning.runs import read_metrics
from fmnist_lightning.settings import Settings
from fmnist_lightning.training import build_trainer, run_fit
from tests.helpers import TINY, TINY_CPU, is_png


def _trainer(tmp_path: Path, **settings: Any) -> Any:
    s = Settings(accelerator="cpu", progress=False, **settings)
    return build_trainer(s, resolve_hardware(s.hardware), tmp_path)


def _callbacks(trainer: Any, kind: type) -> list[Any]:
    return [c for c in trainer.callbacks if isinstance(c, kind)]


def test_defaults_add_nothing(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    assert not _callbacks(trainer, EarlyStopping) and not _callbacks(trainer, EMAWeightAveraging)
    assert trainer.gradient_clip_val is None and trainer.accumulate_grad_batches == 1
    assert trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
    assert not trainer.fast_dev_run and trainer.overfit_batches == 0
    assert type(trainer.profiler).__name__ == "PassThroughProfiler"
    assert len(_callbacks(trainer, FiniteLossGuard)) == 1  # the guard is always on


def test_early_stopping_settings_reach_lightnings_callback(tmp_path: Path) -> None:
    trainer = _trainer(
        tmp_path, early_stopping_patience=3, early_stopping_monitor="val/loss", early_stopping_min_delta=0.01
    )
    (stopper,) = _callbacks(trainer, EarlyStopping)
    assert (stopper.monitor, stopper.patience, stopper.mode) == ("val/loss", 3, "min")
    assert stopper.min_delta == pytest.approx(-0.01)  # Lightning stores it signed by the direction
    (stopper,) = _callbacks(_trainer(tmp_path, early_stopping_patience=1), EarlyStopping)
    assert (stopper.monitor, stopper.mode) == ("val/acc", "max")


def test_trainer_arguments_hold_the_settings(tmp_path: Path) -> None:
    trainer = _trainer(
        tmp_path,
        gradient_clip_val=0.5,
        gradient_clip_algorithm="value",
        accumulate_grad_batches=4,
        val_check_interval=0.25,
        check_val_every_n_epoch=2,
        overfit_batches=2,
    )
    assert trainer.gradient_clip_val == 0.5 and trainer.gradient_clip_algorithm.value == "value"
    assert trainer.accumulate_grad_batches == 4
    assert trainer.val_check_interval == 0.25 and trainer.check_val_every_n_epoch == 2
    assert trainer.overfit_batches == 2
    assert trainer.fast_dev_run is False and _trainer(tmp_path, fast_dev_run=True).fast_dev_run == 1


@pytest.mark.parametrize(("kind", "cls"), [("simple", SimpleProfiler), ("pytorch", PyTorchProfiler)])
def test_profiler_writes_into_the_run_folder(tmp_path: Path, kind: str, cls: type) -> None:
    profiler = _trainer(tmp_path, profiler=kind).profiler
    assert isinstance(profiler, cls) and Path(profiler.dirpath) == tmp_path and profiler.filename == "profile"


def test_weight_averaging_settings_reach_the_callbacks(tmp_path: Path) -> None:
    (ema,) = _callbacks(_trainer(tmp_path, weight_averaging="ema", ema_decay=0.9), EMAWeightAveraging)
    average = ema._kwargs["avg_fn"](torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1))
    assert float(average) == pytest.approx(0.1)  # 0.9 x previous + 0.1 x current
    (swa,) = _callbacks(_trainer(tmp_path, weight_averaging="swa", swa_start=0.5), StochasticWeightAverage)
    assert swa.start == 0.5


def test_bad_values_are_one_line_usage_errors(cli) -> None:
    code, _, err = cli("fit", "--early-stopping-monitor", "train/loss")
    assert code == 2 and "'train/loss' is not one of 'val/acc', 'val/loss'" in err
    code, _, err = cli("fit", "--accumulate-grad-batches", "0")
    assert code == 2 and "accumulate_grad_batches: Input should be greater than or equal to 1, got 0" in err


def test_validation_interval_beyond_the_epoch_is_a_usage_error(real_data: None, cli, tmp_path: Path) -> None:
    code, _, err = cli("fit", *TINY_CPU, "--val-check-interval", "100", "--out", tmp_path / "r")
    assert code == 2 and "error: --val-check-interval 100 is more batches than an epoch has" in err
    assert not (tmp_path / "r").exists()


def test_early_stopping_stops_a_real_run(real_data: None, cli, tmp_path: Path) -> None:
    # min_delta 1: no later epoch can beat the first by a whole point of accuracy.
    out = tmp_path / "run"
    code, stdout, err = cli(
        "fit", *TINY_CPU, "--max-epochs", "5", "--early-stopping-patience", "1", "--early-stopping-min-delta", "1",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "stopped early" in stdout and "after epoch 2" in stdout
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert (out / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_clipped_gradients_train_in_every_precision(real_data: None, tmp_path: Path, precision: str) -> None:
    # Lightning's mixed-precision plugin refuses to clip for a fused optimiser (a traceback, before).
    s = Settings(**{**TINY, "max_epochs": 1}, gradient_clip_val=1.0, precision=precision)
    result = run_fit(s, out=tmp_path / "run")
    assert result.epochs == 1 and (result.run_dir / "checkpoints" / "best.ckpt").is_file()


def test_early_stopping_counts_validations_within_an_epoch(real_data: None, tmp_path: Path) -> None:
    # Two validations per epoch: the second already fails to improve by a whole point.
    s = Settings(
        **{**TINY, "max_epochs": 3}, val_check_interval=0.5, early_stopping_patience=1, early_stopping_min_delta=1
    )
    result = run_fit(s, out=tmp_path / "run")
    assert result.stopped_early_after == 1 and result.epochs == 1


def test_epochs_without_validation_record_no_validation_metrics(real_data: None, tmp_path: Path) -> None:
    result = run_fit(Settings(**{**TINY, "max_epochs": 3}, check_val_every_n_epoch=2), out=tmp_path / "run")
    rows = read_metrics(result.run_dir / "metrics.csv")
    assert ["val/acc" in row for row in rows] == [False, True, False]  # not epoch 2's repeated
    assert result.best_epoch == 2


class RecordWeights(Callback):
    """The raw weights after every optimiser step, and the weights validation evaluates."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _copy(module: Any) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append(self._copy(module))

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.validated.append(self._copy(module))


def _ema(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    average = dict(steps[0])
    for weights in steps[1:]:
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
    return average


def _mean(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([w[k] for w in steps]).mean(dim=0) for k in steps[0]}


@pytest.mark.parametrize(
    ("averaging", "expected"),
    [
        (dict(weight_averaging="ema", ema_decay=0.5), lambda steps: _ema(steps, 0.5)),
        # 4 steps, start 0.5: the average of the weights after steps 2, 3 and 4.
        (dict(weight_averaging="swa", swa_start=0.5), lambda steps: _mean(steps[1:])),
    ],
)
def test_validation_and_checkpoints_use_the_averaged_weights(
    real_data: None, tmp_path: Path, averaging: dict[str, Any], expected: Any
) -> None:
    recorder = RecordWeights()
    result = run_fit(Settings(**TINY, **averaging), out=tmp_path / "run", extra_callbacks=[recorder])
    assert len(recorder.steps) == 4
    average, raw = expected(recorder.steps), recorder.steps[-1]
    (validated,) = recorder.validated
    saved = load_classifier(result.best_checkpoint)  # what test, export and predict load
    for name, value in average.items():
        assert not torch.allclose(value, raw[name], atol=1e-6), name  # the average is not the raw weights
        assert torch.allclose(validated[name], value, atol=1e-6), name
        assert torch.allclose(saved.get_parameter(name), value, atol=1e-6), name


def test_fast_dev_run_leaves_no_files(real_data: None, cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    temporary = set(Path(tempfile.gettempdir()).glob("fmnist-fast-dev-run-*"))
    code, stdout, err = cli("fit", *TINY_CPU, "--fast-dev-run")
    assert code == 0, err
    assert "fast dev run passed" in stdout
    assert list(tmp_path.iterdir()) == []  # no runs/ folder
    assert set(Path(tempfile.gettempdir()).glob("fmnist-fast-dev-run-*")) == temporary
    code, _, err = cli("fit", *TINY_CPU, "--fast-dev-run", "--out", tmp_path / "run")
    assert code == 2 and "--fast-dev-run keeps no files" in err


def test_profiler_report_is_in_the_run_folder_and_named(real_data: None, cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, err = cli("fit", *TINY_CPU, "--profiler", "simple", "--out", out)
    assert code == 0, err
    assert (out / "fit-profile.txt").is_file() and "run_training_epoch" in (out / "fit-profile.txt").read_text()
    assert str(out / "fit-profile.txt") in stdout.replace("\n", "")
    code, _, err = cli("fit", *TINY_CPU, "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "fit-profile.txt").exists()  # --overwrite removes the old run's report too


def test_overfit_batches_trains_on_the_same_batches(real_data: None, tmp_path: Path) -> None:
    class Labels(Callback):
        def __init__(self) -> None:
            self.seen: list[list[int]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.seen.append(batch.labels.tolist())

    labels = Labels()
    run_fit(Settings(**{**TINY, "max_epochs": 2}, overfit_batches=2), out=tmp_path / "run", extra_callbacks=[labels])
    assert len(labels.seen) == 4 and labels.seen[:2] == labels.seen[2:]


class BreakWeights(Callback):
    """Turns one weight into NaN after a given step: the next loss is NaN."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            with torch.no_grad():
                next(module.parameters()).view(-1)[0] = float("nan")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(real_data: None, tmp_path: Path) -> None:
    out = tmp_path / "run"
    s = Settings(**{**TINY, "max_epochs": 3})
    with pytest.raises(NonFiniteLoss, match=r"in epoch 2 at step 7; stopped\. Try a lower --lr .* kept"):
        run_fit(s, out=out, extra_callbacks=[BreakWeights(epoch=1, batch=1)])
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0  # from the end of epoch 1, before the weights broke
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_a_diverging_learning_rate_is_one_line_and_exit_1(real_data: None, cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _, err = cli("fit", *TINY_CPU, "--optimizer", "sgd", "--lr", "1e6", "--max-epochs", "2", "--out", out)
    assert code == 1
    (line,) = [line for line in err.splitlines() if not line.startswith("Fashion-MNIST:")]  # the data source log
    assert line.startswith("error: training loss became NaN or infinite in epoch 1")
    assert "--lr (this run's: 1e+06)" in line and "--gradient-clip-val" in line
    # The loss broke in the first epoch, before any save: nothing was kept, so no checkpoint with
    # broken weights was written either (the guard runs before every save).
    assert line.endswith("no checkpoint had been saved yet") and not list(out.rglob("*.ckpt"))


def test_lr_find_plots_and_suggests_a_rate(real_data: None, cli, tmp_path: Path, monkeypatch) -> None:
    from fmnist_lightning import lr_find
    from fmnist_lightning.lr_find import format_lr

    finders: list[Any] = []

    class RecordingTuner(lr_find.Tuner):  # keeps the range test's curve, which the tool only plots
        def lr_find(self, *args: Any, **kwargs: Any) -> Any:
            finders.append(super().lr_find(*args, **kwargs))
            return finders[-1]

    monkeypatch.setattr(lr_find, "Tuner", RecordingTuner)
    out = tmp_path / "lr"
    code, stdout, err = cli(
        "lr-find", "--offline", "--accelerator", "cpu", "--no-progress", "--steps", "10", "--no-dropout", "--out", out
    )
    assert code == 0, err
    assert is_png(out / "lr_find.png")
    suggestion = stdout.split("suggested learning rate: ")[1].split()[0]
    # Lightning's rule on the recorded curve: the rate where the smoothed loss falls most steeply
    # against the rate, leaving out the first points (10, or a tenth of a short test: here 1) and the last.
    (finder,) = finders
    assert len(finder.results["lr"]) == 10
    points = zip(finder.results["lr"][1:-1], finder.results["loss"][1:-1])
    finite = [(lr, loss) for lr, loss in points if math.isfinite(loss)]
    lrs, losses = (torch.tensor(values) for values in zip(*finite))
    steepest = int(torch.gradient(losses, spacing=[lrs])[0].argmin())
    assert suggestion == format_lr(finite[steepest][0])
    assert (
        f"train with it: fmnist fit --no-dropout --offline --accelerator cpu --no-progress --lr {suggestion}" in stdout
    )
    assert "Finding best initial lr" not in err  # --no-progress hides the range test's own bar too


def test_sample_grid_titles_overlap_nothing() -> None:
    import matplotlib.pyplot as plt

    from fmnist_lightning.data import CLASS_NAMES
    from fmnist_lightning.plots import image_grid_figure

    # The widest titles write_sample_grids can make, on every image of a 3 x 5 grid.
    longest = max(CLASS_NAMES, key=len)
    fig = image_grid_figure(torch.rand(15, 1, 28, 28), [f"Predicted {longest}\nClass {longest}"] * 15)
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes] + [
        ax.images[0].get_window_extent(renderer) for ax in fig.axes
    ]
    plt.close(fig)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
