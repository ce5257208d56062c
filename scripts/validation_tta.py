"""Does test-time flip augmentation pay? Answered on the validation split only, so that the choice
of `fmnist test --tta` for a recipe never looks at the test set.

python scripts/validation_tta.py RUN_DIR [RUN_DIR ...] [--shifts 1,2] [--data-dir DIR] [--json PATH]

For each run folder, its checkpoints/best.ckpt classifies the 5,000 validation images as they are,
and averaged with their horizontal mirror (what `--tta` does); prints both accuracies, their mean
over the runs, and writes them as JSON with --json. `--shifts 1,2` also measures, for each
distance d, the flip averaged over the image moved by d pixels left, right, up and down too (ten
views, the blank border filled with 0): airbench's shift TTA, not (yet) an option of `fmnist test`.
"""

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
import typer

from fmnist_lightning.checkpoints import load_classifier
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import FmnistError
from fmnist_lightning.model import flip_averaged_logits
from fmnist_lightning.runs import BEST_CHECKPOINT
from fmnist_lightning.settings import DataSettings, EvaluationSettings


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The images moved dy pixels down and dx right (negative: up, left), the border filled with 0."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def shift_averaged_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, d: int) -> torch.Tensor:
    """The log of the mean softmax over the flip TTA of the image and of it moved d pixels each way."""
    moves = ((0, 0), (0, d), (0, -d), (d, 0), (-d, 0))
    views = [flip_averaged_logits(model, shifted(images, dy, dx)) for dy, dx in moves]
    return torch.logsumexp(torch.stack(views), dim=0) - math.log(len(views))


def validation_accuracy(run: Path, datamodule: FashionMNISTDataModule, shifts: list[int]) -> dict[str, float]:
    model = load_classifier(run / BEST_CHECKPOINT).to_channels_last().eval()
    kinds: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "plain": model,
        "tta": lambda images: flip_averaged_logits(model, images),
    }
    for d in shifts:
        kinds[f"tta+shift{d}"] = lambda images, d=d: shift_averaged_logits(model, images, d)
    correct, seen = dict.fromkeys(kinds, 0), 0
    with torch.inference_mode():
        for batch in datamodule.val_dataloader():  # the batches validation in `fmnist fit` sees
            for kind, logits in kinds.items():
                correct[kind] += int((logits(batch.images).argmax(dim=1) == batch.labels).sum())
            seen += len(batch.labels)
    return {name: count / seen for name, count in correct.items()}


def main(
    runs: Annotated[list[Path], typer.Argument(help="Run folders, each with checkpoints/best.ckpt.")],
    data_dir: Annotated[str, typer.Option(help="Where to look for Fashion-MNIST before the system copy.")] = "data",
    json_path: Annotated[
        Optional[Path], typer.Option("--json", help="Also write the numbers to this JSON file.")
    ] = None,
    shifts: Annotated[
        str, typer.Option(help="Also the flip TTA over shifted copies, for each distance in pixels, e.g. '1,2'.")
    ] = "",
) -> None:
    distances = [int(d) for d in shifts.split(",") if d.strip()]
    try:
        datamodule = FashionMNISTDataModule.from_settings(
            DataSettings(data_dir=data_dir, offline=True), EvaluationSettings().eval_batch_size
        )
        datamodule.setup()
        results = {str(run): validation_accuracy(run, datamodule, distances) for run in runs}
    except FmnistError as exc:  # a missing run or data: one line, as the fmnist commands say it
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for run, acc in results.items():
        shifted_text = "".join(f", {acc[f'tta+shift{d}']:.4f} with flip and {d}-pixel shift TTA" for d in distances)
        typer.echo(f"{run}: val acc {acc['plain']:.4f} plain, {acc['tta']:.4f} with flip TTA{shifted_text}")
    mean = {kind: statistics.mean(acc[kind] for acc in results.values()) for kind in next(iter(results.values()))}
    typer.echo(
        f"mean over {len(results)}: {mean['plain']:.4f} plain, {mean['tta']:.4f} with flip TTA "
        f"({100 * (mean['tta'] - mean['plain']):+.2f} points, {len(datamodule.split('val')[1])} validation images)"
    )
    for d in distances:
        gain = 100 * (mean[f"tta+shift{d}"] - mean["plain"])
        typer.echo(f"  with flip and {d}-pixel shift TTA: {mean[f'tta+shift{d}']:.4f} ({gain:+.2f} points)")
    if json_path:
        json_path.write_text(json.dumps({"runs": results, "mean": mean}, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
