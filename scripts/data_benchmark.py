"""One training epoch of batches: the data module's tensor batcher vs torchvision's per-sample pipeline.

python scripts/data_benchmark.py [--json PATH] [--data-dir DIR]
"""

import argparse
import json
from pathlib import Path

from fmnist_lightning.bench import bench_data

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data-dir", default="data", help="where to look for Fashion-MNIST before the system copy")
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
args = parser.parse_args()
result = bench_data(args.data_dir, args.batch_size)
rates = result["batches_per_s"]
print(
    f"one 55k epoch, batch {args.batch_size}: fmnist {rates['fmnist']:,.0f} batches/s, "
    f"torchvision + ToTensor + DataLoader {rates['torchvision']:,.0f} batches/s: {result['ratio']:.0f}x "
    f"({result['machine']['cpu']}, torch {result['versions']['torch']})"
)
if args.json:
    args.json.write_text(json.dumps(result, indent=2) + "\n")
