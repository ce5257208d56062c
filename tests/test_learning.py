"""Real learning tests: the tutorial CNN learns Fashion-MNIST on the CPU, and so does the ResNet of
`configs/strong.yaml` on a small batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fmnist_lightning.data import to_float_images
from fmnist_lightning.evaluation import run_test
from fmnist_lightning.settings import Settings
from fmnist_lightning.training import run_fit


@pytest.mark.slow
def test_one_epoch_on_the_full_train_split_reaches_85_percent(real_data: None, tmp_path: Path) -> None:
    # The tutorial's plain model: dropout slows the first epoch down (it pays off over many).
    s = Settings(
        max_epochs=1, dropout=False, lr_schedule="none", offline=True, progress=False, accelerator="cpu", seed=0
    )
    result = run_fit(s, out=tmp_path / "run")
    assert result.epochs == 1
    _, report = run_test(result.best_checkpoint, s.evaluation_run(), tmp_path / "run")
    assert report is not None and report["num_samples"] == 10000
    assert report["accuracy"] >= 0.85, report["accuracy"]


def test_resnet_of_the_strong_config_learns_and_round_trips(datamodule, tmp_path: Path) -> None:
    """A few optimiser steps of configs/strong.yaml's network on one small real batch lower its
    loss, and its checkpoint rebuilds the same network with the same outputs."""
    from fmnist_lightning.checkpoints import load_classifier
    from fmnist_lightning.settings import resolve_settings
    from tests.helpers import classifier

    strong = resolve_settings(Path("configs/strong.yaml"))
    assert strong.model.network == "resnet"
    torch.manual_seed(0)
    model = classifier(network="resnet", dropout=strong.model.dropout, dropout_dense=strong.model.dropout_dense)
    images, labels = datamodule.split("train")
    x, y = to_float_images(images[:32]), labels[:32]
    optimizer = torch.optim.AdamW(model.parameters(), lr=strong.optimisation.lr)
    model.train()
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses

    import lightning as L

    path = tmp_path / "resnet.ckpt"
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    again = load_classifier(path)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-5)
