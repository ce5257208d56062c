"""Does test-time flip augmentation pay? Answered on the validation split only, so that the choice
of `fmnist test --tta` for a recipe never looks at the test set.

python scripts/validation_tta.py RUN_DIR [RUN_DIR ...] [--data-dir DIR] [--json PATH]

For each run folder, its checkpoints/best.ckpt classifies the 5,000 validation images as they are,
and averaged with their horizontal mirror (what `--tta` does); prints both accuracies, their mean
over the runs, and writes them as JSON with --json.
"""

import json
import statistics
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from fmnist_lightning.checkpoints import load_classifier
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import FmnistError
from fmnist_lightning.model import flip_averaged_logits
from fmnist_lightning.runs import BEST_CHECKPOINT
from fmnist_lightning.settings import DataSettings, EvaluationSettings


def validation_accuracy(run: Path, datamodule: FashionMNISTDataModule) -> dict[str, float]:
    model = load_classifier(run / BEST_CHECKPOINT).to_channels_last().eval()
    correct, seen = {"plain": 0, "tta": 0}, 0
    with torch.inference_mode():
        for batch in datamodule.val_dataloader():  # the batches validation in `fmnist fit` sees
            correct["plain"] += int((model(batch.images).argmax(dim=1) == batch.labels).sum())
            correct["tta"] += int((flip_averaged_logits(model, batch.images).argmax(dim=1) == batch.labels).sum())
            seen += len(batch.labels)
    return {name: count / seen for name, count in correct.items()}


def main(
    runs: Annotated[list[Path], typer.Argument(help="Run folders, each with checkpoints/best.ckpt.")],
    data_dir: Annotated[str, typer.Option(help="Where to look for Fashion-MNIST before the system copy.")] = "data",
    json_path: Annotated[
        Optional[Path], typer.Option("--json", help="Also write the numbers to this JSON file.")
    ] = None,
) -> None:
    try:
        datamodule = FashionMNISTDataModule.from_settings(
            DataSettings(data_dir=data_dir, offline=True), EvaluationSettings().eval_batch_size
        )
        datamodule.setup()
        results = {str(run): validation_accuracy(run, datamodule) for run in runs}
    except FmnistError as exc:  # a missing run or data: one line, as the fmnist commands say it
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for run, acc in results.items():
        typer.echo(f"{run}: val acc {acc['plain']:.4f} plain, {acc['tta']:.4f} with flip TTA")
    mean = {kind: statistics.mean(acc[kind] for acc in results.values()) for kind in ("plain", "tta")}
    typer.echo(
        f"mean over {len(results)}: {mean['plain']:.4f} plain, {mean['tta']:.4f} with flip TTA "
        f"({100 * (mean['tta'] - mean['plain']):+.2f} points, {len(datamodule.split('val')[1])} validation images)"
    )
    if json_path:
        json_path.write_text(json.dumps({"runs": results, "mean": mean}, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
