"""One real learning test: the tutorial CNN learns Fashion-MNIST on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmnist_lightning.config import Settings
from fmnist_lightning.evaluation import run_test
from fmnist_lightning.training import run_fit


@pytest.mark.slow
def test_one_epoch_on_the_full_train_split_reaches_85_percent(real_data: None, tmp_path: Path) -> None:
    # The tutorial's plain model: dropout slows the first epoch down (it pays off over many).
    s = Settings(
        max_epochs=1, dropout=False, lr_schedule="none", offline=True, progress=False, accelerator="cpu", seed=0
    )
    result = run_fit(s, out=tmp_path / "run")
    assert result.epochs == 1
    _, report = run_test(result.best_checkpoint, s, tmp_path / "run")
    assert report is not None and report["num_samples"] == 10000
    assert report["accuracy"] >= 0.85, report["accuracy"]
