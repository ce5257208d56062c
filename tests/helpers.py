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
