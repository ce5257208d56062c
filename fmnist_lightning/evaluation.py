"""Loading checkpoints safely, evaluating the official test set, and the reports `fmnist test` writes."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fmnist_lightning.config import Settings
from fmnist_lightning.data import CLASS_NAMES, FashionMNISTDataModule
from fmnist_lightning.errors import CheckpointError, FmnistError, UsageError
from fmnist_lightning.model import CHECKPOINT_FORMAT, FashionClassifier
from fmnist_lightning.run_files import (
    BEST_CHECKPOINT,
    CONFUSION_MATRIX,
    CORRECT_SAMPLES,
    INCORRECT_SAMPLES,
    PREDICTIONS,
    TEST_REPORT,
)
from fmnist_lightning.training import Hardware, hardware_for

MAX_SAMPLES = 100  # images per grid in predict-samples: more would not be readable (nor fit a PNG)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by this package, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .ckpt file (e.g. {path / BEST_CHECKPOINT})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        # weights_only: a checkpoint is data; never run code from a file the user points us at.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a PyTorch file ({reason})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    ours = ckpt.get("fmnist_lightning")
    if not isinstance(ours, dict) or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} was not written by fmnist-lightning (another program's checkpoint)")
    if ours.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {ours.get('format')}, this version reads format {CHECKPOINT_FORMAT}"
        )
    return ckpt


def load_classifier(path: Path) -> FashionClassifier:
    """Rebuild the trained model (the right network and dropout variant) from a checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        model = FashionClassifier(**ckpt["hyper_parameters"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} holds a model this version cannot rebuild ({str(exc).splitlines()[0][:160]})"
        ) from None
    return model.eval()


@dataclass
class TestResults:
    """Everything one pass over the test set gives: metric values and per-image probabilities."""

    metrics: dict[str, torch.Tensor]
    probabilities: torch.Tensor  # (N, 10), in test-set order
    labels: torch.Tensor  # (N,)
    index: torch.Tensor  # (N,) test-set index of each row: 0..N-1, each once
    images: torch.Tensor  # (N, 28, 28) uint8, the test images in the same order
    is_global_zero: bool

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


def evaluate(
    ckpt: Path,
    hw: Hardware,
    data_dir: str | Path = "data",
    offline: bool = False,
    eval_batch_size: int = 250,
    engine: str = "torch",
) -> TestResults:
    """Evaluate a checkpoint on the official 10,000 test images, each exactly once (also under DDP).

    The `torch` engine runs the fast path: channels_last layout and inference mode, whatever
    layout the model was trained in (same arithmetic in another memory order; `tests/test_model.py`
    checks agreement). `onnxruntime` exports the network and runs it there (CPU, fp32).
    """
    model = load_classifier(ckpt).to_channels_last()
    datamodule = FashionMNISTDataModule(data_dir=data_dir, offline=offline, eval_batch_size=eval_batch_size)
    trainer = L.Trainer(
        accelerator=hw.accelerator,
        devices=hw.devices,
        strategy=hw.strategy,
        num_nodes=hw.num_nodes,
        precision=hw.precision,  # type: ignore[arg-type]
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    with evaluation_engine(model, engine, hw):
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
    )


def evaluate_with(ckpt: Path, s: Settings) -> TestResults:
    """`evaluate` with the hardware, data and evaluation options of a command's settings."""
    return evaluate(ckpt, hardware_for(s), s.data_dir, s.offline, s.eval_batch_size, s.eval_engine)


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
    """correct.png and incorrect.png in `out`, each image titled "Predicted X, Class Y"; returns the indices."""
    from fmnist_lightning.plots import plot_image_grid

    check_sample_count(num)
    picked = dict(zip(("correct", "incorrect"), pick_samples(results, num)))
    for indices, file in zip(picked.values(), (CORRECT_SAMPLES, INCORRECT_SAMPLES)):
        titles = [
            f"Predicted {CLASS_NAMES[results.predicted[i]]}, Class {CLASS_NAMES[results.labels[i]]}" for i in indices
        ]
        plot_image_grid(results.images[indices], titles, out / file)
    return picked


def check_output_dir(out: Path) -> None:
    """Fail in a second, before any long computation, when `out` could not be created or written.
    (Nothing is created here: a command that fails later leaves no empty folder behind.)"""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FmnistError(f"cannot create output folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise FmnistError(f"output folder {out} is not writable")


def run_test(ckpt: Path, s: Settings, out: Path) -> tuple[TestResults, dict[str, Any] | None]:
    """What `fmnist test` does: evaluate, then (on rank 0) write report.json, predictions.csv and the
    confusion matrix to `out`. Returns the results and the report (None on other ranks)."""
    results = evaluate_with(ckpt, s)
    if not results.is_global_zero:
        return results, None
    report = classification_report(results)
    write_test_outputs(results, report, out)
    return results, report
