"""Benchmark training and evaluation speed; the same as `fmnist bench` (see --help).

The table in docs/performance.md:
  python scripts/benchmark.py --paths raw,fmnist,typical,fmnist-fast --repeats 12 --steps 100 --json runs/bench.json
"""

import sys

from fmnist_lightning.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
