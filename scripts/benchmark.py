"""Benchmark training and evaluation speed; the same as `fmnist bench` (see --help).

Example (the README's table): python scripts/benchmark.py --json runs/bench-cpu.json
"""

import sys

from fmnist_lightning.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
