"""One training epoch of batches: the data module's tensor batcher vs torchvision's per-sample pipeline.

python scripts/data_benchmark.py [--json PATH] [--data-dir DIR] [--batch-size N]
"""

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from fmnist_lightning.baselines import torchvision_copy
from fmnist_lightning.bench import machine
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.runs import provenance
from fmnist_lightning.settings import DataSettings


def bench_data(data_dir: str, batch_size: int) -> dict[str, Any]:
    """Batches per second over one 55k training epoch: our tensor batcher vs torchvision's
    FashionMNIST + ToTensor + DataLoader (shuffle, 0 workers), measured one after the other."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    dm = FashionMNISTDataModule.from_settings(DataSettings(data_dir=data_dir, offline=True), batch_size, batch_size)
    dm.setup()
    rates = {}
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-data-") as tmp:
        root = torchvision_copy(data_dir, Path(tmp))
        tv = datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor())
        tv_train = Subset(tv, range(dm.val_size, len(tv)))  # the same 55k images
        loaders: dict[str, Any] = {
            "fmnist": dm.train_dataloader(),
            "torchvision": DataLoader(tv_train, batch_size=batch_size, shuffle=True),
        }
        for name, loader in loaders.items():
            start = time.perf_counter()
            batches = len([None for _ in loader])
            rates[name] = batches / (time.perf_counter() - start)
    return {
        "batches_per_s": rates,
        "ratio": rates["fmnist"] / rates["torchvision"],
        "batch_size": batch_size,
        "machine": machine(torch.device("cpu")).to_json(),
        "versions": provenance(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(
    data_dir: Annotated[str, typer.Option(help="Where to look for Fashion-MNIST before the system copy.")] = "data",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 128,
    json_path: Annotated[
        Optional[Path], typer.Option("--json", help="Also write the result to this JSON file.")
    ] = None,
) -> None:
    result = bench_data(data_dir, batch_size)
    rates = result["batches_per_s"]
    typer.echo(
        f"one 55k epoch, batch {batch_size}: fmnist {rates['fmnist']:,.0f} batches/s, "
        f"torchvision + ToTensor + DataLoader {rates['torchvision']:,.0f} batches/s: {result['ratio']:.0f}x "
        f"({result['machine']['cpu']}, torch {result['versions']['torch']})"
    )
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
