"""Helpers for the tests that run the real launchers (torchrun, SLURM) in subprocesses."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A fit in seconds: the launchers are what is under test, not the learning.
TINY_FIT = ["--offline", "--max-epochs", "1", "--limit-train-batches", "4", "--no-progress"]


def launcher_env(**extra: str) -> dict[str, str]:
    """A clean environment for a launched process: this Python's bin first on PATH (torchrun, fmnist),
    this checkout's package first on the import path, one thread per process (two processes share
    two cores here), and nothing inherited that could steer Lightning (no SLURM_* or RANK)."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    return env | extra


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
