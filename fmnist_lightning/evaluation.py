"""Evaluating a checkpoint on the official test set, and the reports `fmnist test`,
`predict-samples` and `report` write from it."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmnist_lightning.checkpoints import load_classifier
from fmnist_lightning.data import CLASS_NAMES, FashionMNISTDataModule, SplitSummary, first_of_each_class, summarize
from fmnist_lightning.errors import UsageError
from fmnist_lightning.hardware import Hardware, resolve_hardware
from fmnist_lightning.html_report import stale_outputs, write_report
from fmnist_lightning.model import FashionClassifier
from fmnist_lightning.runs import (
    BEST_CHECKPOINT,
    CONFUSION_MATRIX,
    CORRECT_SAMPLES,
    INCORRECT_SAMPLES,
    PREDICTIONS,
    TEST_REPORT,
    check_output_dir,
    default_out_for,
)
from fmnist_lightning.settings import DataSettings, EvaluationRun
from fmnist_lightning.tracking import log_run_files
from fmnist_lightning.trainer_factory import make_trainer

MAX_SAMPLES = 100  # images per grid in predict-samples: more would not be readable (nor fit a PNG)


@dataclass
class TestResults:
    """Everything one pass over the test set gives: metric values and per-image probabilities."""

    metrics: dict[str, torch.Tensor]
    probabilities: torch.Tensor  # (N, 10), in test-set order
    labels: torch.Tensor  # (N,)
    index: torch.Tensor  # (N,) test-set index of each row: 0..N-1, each once
    images: torch.Tensor  # (N, 28, 28) uint8, the test images in the same order
    is_global_zero: bool
    tta: bool  # the probabilities average each image's and its mirror's (test-time flip augmentation)

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)


@contextlib.contextmanager
def evaluation_engine(model: FashionClassifier, engine: str, hw: Hardware) -> Iterator[FashionClassifier]:
    """Inside the block, `engine` runs the model's network (inference only); `torch` changes nothing."""
    if engine != "onnxruntime":
        yield model
        return
    if hw.accelerator != "cpu" or hw.precision != "32-true":
        raise UsageError(
            "--eval-engine onnxruntime runs fp32 on the CPU: use it with --accelerator cpu --precision 32-true "
            f"(got {hw.accelerator}, {hw.precision}), or keep the default torch engine"
        )
    from fmnist_lightning.inference import OnnxRuntimeNet

    torch_net, threads = model.net, torch.get_num_threads()
    model.net = OnnxRuntimeNet(torch_net)  # with PyTorch's thread count
    # onnxruntime has its own threads. PyTorch's OpenMP threads, once woken by a torch op (building
    # a batch), spin-wait for more work on the cores onnxruntime is using: with 250-image batches
    # that cost a quarter of the speed here. With one torch thread there are none to spin.
    torch.set_num_threads(1)
    try:
        yield model
    finally:
        torch.set_num_threads(threads)
        model.net = torch_net


def evaluate(ckpt: Path, s: EvaluationRun) -> TestResults:
    """Evaluate a checkpoint on the official 10,000 test images, each exactly once (also under DDP),
    with the hardware, data and evaluation sections of `s`.

    The `torch` engine runs the fast path: channels_last layout and inference mode, whatever
    layout the model was trained in (same arithmetic in another memory order; `tests/test_model.py`
    checks agreement). `onnxruntime` exports the network and runs it there (CPU, fp32).
    """
    hardware = s.hardware
    if s.evaluation.eval_engine == "onnxruntime" and hardware.precision == "auto":
        hardware = hardware.model_copy(update={"precision": "32-true"})  # what that engine runs: auto picks it
    hw = resolve_hardware(hardware)
    model = load_classifier(ckpt).to_channels_last()
    model.flip_tta = s.evaluation.tta
    datamodule = FashionMNISTDataModule.from_settings(s.data, s.evaluation.eval_batch_size)
    trainer = make_trainer(hw)
    with evaluation_engine(model, s.evaluation.eval_engine, hw):
        trainer.test(model, datamodule=datamodule, verbose=False)
    values = model.test_results
    images, labels = datamodule.split("test")
    return TestResults(
        metrics={k: v for k, v in values.items() if k not in ("index", "probabilities")},
        probabilities=values["probabilities"],
        labels=labels[values["index"]],
        index=values["index"],
        images=images[values["index"]],
        is_global_zero=trainer.is_global_zero,
        tta=s.evaluation.tta,
    )


def classification_report(results: TestResults) -> dict[str, Any]:
    """The report as `report.json` holds it: scikit-learn's classification_report, plus loss and confusion."""
    m = results.metrics
    confusion = m["confusion"].long()
    support = confusion.sum(dim=1)

    def scores(kind: str) -> dict[str, float]:
        return {
            "precision": float(m[f"precision_{kind}"]),
            "recall": float(m[f"recall_{kind}"]),
            "f1": float(m[f"f1_{kind}"]),
            "support": int(support.sum()),
        }

    per_class = {
        name: {
            "precision": float(m["precision_none"][i]),
            "recall": float(m["recall_none"][i]),
            "f1": float(m["f1_none"][i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(CLASS_NAMES)
    }
    return {
        "accuracy": float(m["acc"]),
        "loss": float(m["loss"]),
        "num_samples": int(results.index.numel()),
        "per_class": per_class,
        "macro_avg": scores("macro"),
        "weighted_avg": scores("weighted"),
        "confusion_matrix": confusion.tolist(),
        "tta": results.tta,
    }


def write_predictions_csv(results: TestResults, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "predicted", *(f"p_{name}" for name in CLASS_NAMES)])
        for i, label, pred, probs in zip(
            results.index.tolist(), results.labels.tolist(), results.predicted.tolist(), results.probabilities.tolist()
        ):
            writer.writerow([i, label, pred, *(f"{p:.6f}" for p in probs)])


def write_test_outputs(results: TestResults, report: dict[str, Any], out: Path) -> None:
    """report.json, predictions.csv and confusion_matrix.png in `out`."""
    from fmnist_lightning.plots import plot_confusion_matrix

    out.mkdir(parents=True, exist_ok=True)
    (out / TEST_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    write_predictions_csv(results, out / PREDICTIONS)
    plot_confusion_matrix(report["confusion_matrix"], out / CONFUSION_MATRIX)


def pick_samples(results: TestResults, num: int) -> tuple[list[int], list[int]]:
    """The first `num` correctly and incorrectly classified test indices (as the tutorial shows them)."""
    correct = (results.predicted == results.labels).nonzero().flatten()
    wrong = (results.predicted != results.labels).nonzero().flatten()
    return results.index[correct[:num]].tolist(), results.index[wrong[:num]].tolist()


def check_sample_count(num: int) -> None:
    if not 1 <= num <= MAX_SAMPLES:
        raise UsageError(f"--num must be between 1 and {MAX_SAMPLES}, got {num}")


def write_sample_grids(results: TestResults, num: int, out: Path) -> dict[str, list[int]]:
    """correct.png and incorrect.png in `out`, each image titled "Predicted X" over "Class Y"; returns the indices."""
    from fmnist_lightning.plots import plot_image_grid

    check_sample_count(num)
    picked = dict(zip(("correct", "incorrect"), pick_samples(results, num)))
    for indices, file in zip(picked.values(), (CORRECT_SAMPLES, INCORRECT_SAMPLES)):
        titles = [
            # Two lines: "Predicted T-shirt/top, Class Pullover" on one is wider than its image.
            f"Predicted {CLASS_NAMES[results.predicted[i]]}\nClass {CLASS_NAMES[results.labels[i]]}"
            for i in indices
        ]
        plot_image_grid(results.images[indices], titles, out / file)
    return picked


def predict_samples(ckpt: Path, s: EvaluationRun, num: int, out: Path) -> dict[str, list[int]] | None:
    """What `fmnist predict-samples` does: evaluate, then (on rank 0) write correct.png and
    incorrect.png to `out`. Returns the indices shown (None on other ranks)."""
    check_sample_count(num)  # before the evaluation, so a bad --num fails at once
    check_output_dir(out)
    results = evaluate(ckpt, s)
    return write_sample_grids(results, num, out) if results.is_global_zero else None


def run_test(ckpt: Path, s: EvaluationRun, out: Path) -> tuple[TestResults, dict[str, Any] | None]:
    """What `fmnist test` does: evaluate, then (on rank 0) write report.json, predictions.csv and the
    confusion matrix to `out`. Returns the results and the report (None on other ranks). An `out`
    that could not be written fails before the evaluation."""
    check_output_dir(out)
    results = evaluate(ckpt, s)
    if not results.is_global_zero:
        return results, None
    report = classification_report(results)
    write_test_outputs(results, report, out)
    log_run_files(default_out_for(ckpt), (out / TEST_REPORT, out / CONFUSION_MATRIX))
    return results, report


@dataclass
class ReportUpdate:
    """What `make_report` had to (re)compute before writing the page; None where nothing was."""

    report: dict[str, Any] | None
    samples: dict[str, list[int]] | None
    page: Path | None  # None on DDP ranks other than 0


def make_report(run_dir: Path, s: EvaluationRun, num_samples: int = 9) -> ReportUpdate:
    """What `fmnist report` does: bring the test report and sample grids up to date with the run's
    best checkpoint (one pass over the test set serves both), then write `report.html`."""
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} does not exist or is not a folder")
    stale_test, stale_samples = stale_outputs(run_dir)
    update = ReportUpdate(report=None, samples=None, page=None)
    if stale_test or stale_samples:
        results = evaluate(run_dir / BEST_CHECKPOINT, s)
        if not results.is_global_zero:
            return update
        if stale_test:
            update.report = classification_report(results)
            write_test_outputs(results, update.report, run_dir)
        if stale_samples:
            update.samples = write_sample_grids(results, num_samples, run_dir)
    update.page = write_report(run_dir)
    return update


@dataclass
class DataAnalysis:
    source: str
    summary: dict[str, SplitSummary]
    samples_png: Path


def analyse_data(data: DataSettings, out: Path) -> DataAnalysis:
    """What `fmnist data` does, as the tutorial's "analyse the data": each split's shapes, pixel
    range and images per class, and `samples.png` with the first image of each class."""
    from fmnist_lightning.plots import plot_image_grid

    check_output_dir(out)
    dm = FashionMNISTDataModule.from_settings(data, eval_batch_size=1)  # reads the splits, draws no batches
    dm.setup()
    images, labels = dm.split("train")
    first = first_of_each_class(labels)
    path = out / "samples.png"
    plot_image_grid(images[first], [CLASS_NAMES[labels[i]] for i in first], path)
    return DataAnalysis(dm.source, summarize(dm), path)
