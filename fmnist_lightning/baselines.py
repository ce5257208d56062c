"""The two baselines `fmnist bench` measures the project against, timed as the project's path is
(`timing.py`):

- `raw`: a hand-written PyTorch loop over tensors already in memory (the floor to beat);
- `typical`: what most tutorials write: torchvision `FashionMNIST` + `ToTensor` + `DataLoader`
  (shuffle, 0 workers) + a default `lightning.Trainer`, on a copy of the data in torchvision's layout.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from fmnist_lightning.data import FashionMNISTDataModule, to_float_images
from fmnist_lightning.hardware import Hardware, synchronize
from fmnist_lightning.model import build_optimizer
from fmnist_lightning.networks import build_network
from fmnist_lightning.settings import BenchConfig, ModelSettings
from fmnist_lightning.sources import FILES, locate, read_verified
from fmnist_lightning.timing import PathResult, StepTimer, epochs_for, measured_result, total_steps


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def fit_network() -> torch.nn.Module:
    """The network a bare `fmnist fit` trains (the tutorial CNN with its default dropout): every
    path of the benchmark trains this one."""
    m = ModelSettings()
    return build_network(m.network, m.dropout, m.dropout_conv, m.dropout_dense)


def bench_raw(cfg: BenchConfig, dm: FashionMNISTDataModule, hw: Hardware, device: torch.device) -> PathResult:
    """The floor: a plain loop, whole splits as float tensors on the device, no framework."""
    torch.manual_seed(cfg.seed)
    images, labels = (t.to(device) for t in dm.split("train"))
    x_all = to_float_images(images)
    net = fit_network().to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    if cfg.compile:
        net.compile()
    opt = build_optimizer("adam", net.parameters(), lr=1e-3, weight_decay=0.0, device=device)  # as fmnist's
    order = torch.randperm(len(labels), device=device)
    n, eval_batch = cfg.batch_size, cfg.eval_batch_size

    def step(i: int) -> None:
        idx = order[(i * n) % (len(order) - n) :][:n]
        x = x_all[idx].contiguous(memory_format=memory_format)
        with _autocast(device, hw.precision):
            loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    synchronize(device)
    start = time.perf_counter()
    for i in range(cfg.warmup_steps):
        step(i)
    synchronize(device)
    warm = time.perf_counter()
    for i in range(cfg.warmup_steps, total_steps(cfg)):
        step(i)
    synchronize(device)
    speed = cfg.steps * n / (time.perf_counter() - warm)

    test_images = to_float_images(dm.split("test")[0].to(device))
    net.eval()

    def evaluate() -> None:
        for i in range(0, len(test_images), eval_batch):
            net(test_images[i : i + eval_batch].contiguous(memory_format=memory_format))

    with torch.inference_mode(), _autocast(device, hw.precision):
        if cfg.compile:
            evaluate()  # compiles every evaluation shape, untimed
        synchronize(device)
        t0 = time.perf_counter()
        evaluate()
        synchronize(device)
        eval_speed = len(test_images) / (time.perf_counter() - t0)
    return measured_result(speed, warm - start, eval_speed, eval_batch, device)


class TypicalModule(L.LightningModule):
    """The LightningModule a typical tutorial writes: integer labels, per-step logging. It, and
    the default `lightning.Trainer` that trains it, are the baseline on purpose: they are not
    built by this package's factories."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.net = fit_network()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def torchvision_copy(data_dir: str, root: Path) -> Path:
    """torchvision's FashionMNIST wants the uncompressed files in ROOT/FashionMNIST/raw."""
    paths, _ = locate(Path(data_dir), offline=True)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for key, spec in FILES.items():
        (raw / spec.name).write_bytes(read_verified(paths[key], spec))
    return root


def bench_typical(cfg: BenchConfig, hw: Hardware, workdir: Path, root: Path) -> PathResult:
    """`root`: what `torchvision_copy` made (once per benchmark, not per round)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    train = datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor())
    test = datasets.FashionMNIST(str(root), train=False, transform=transforms.ToTensor())
    L.seed_everything(cfg.seed, verbose=False)
    model = TypicalModule(cfg.channels_last)
    if cfg.compile:
        model.net.compile()
    timer = StepTimer(cfg)
    trainer = L.Trainer(
        accelerator=hw.accelerator,
        devices=1,
        precision=hw.precision,  # type: ignore[arg-type]
        max_epochs=epochs_for(cfg)[1],
        callbacks=[timer],
        default_root_dir=str(workdir / "typical"),
    )
    # The official 60k training file: one epoch holds more than 55k images' worth of full batches.
    trainer.fit(model, DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True))
    test_loader = DataLoader(test, batch_size=cfg.eval_batch_size)
    if cfg.compile:
        trainer.test(model, test_loader, verbose=False)  # compiles the evaluation shapes, untimed
    trainer.test(model, test_loader, verbose=False)
    return timer.result(cfg, cfg.eval_batch_size, trainer.strategy.root_device)
