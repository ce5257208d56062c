"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmnist_lightning.config import Settings


def is_png(path: Path) -> bool:
    from PIL import Image

    if not path.is_file() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    with Image.open(path) as image:
        image.verify()
    return True


def classifier(input_mean: float = 0.0, input_std: float = 1.0, **settings: Any) -> Any:
    """A FashionClassifier built as `fmnist fit` builds it, from settings (defaults unless given)."""
    from fmnist_lightning.model import FashionClassifier

    return FashionClassifier.from_settings(Settings(**settings), input_mean, input_std)


REPO = Path(__file__).parent.parent


def need(module: str, extra: str) -> None:
    """Skip when an optional package is missing; in CI (which installs every extra) fail instead."""
    import importlib.util
    import os

    import pytest

    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed: pip install 'fmnist-lightning[{extra}]'"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for an `fmnist` subprocess: this checkout's package, a wide terminal."""
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(ready: Any, timeout_s: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.5)
