"""One training epoch of batches: the data module's tensor batcher vs torchvision's per-sample pipeline.

python scripts/data_benchmark.py [--json PATH] [--data-dir DIR] [--batch-size N]
"""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from fmnist_lightning.bench import bench_data


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
