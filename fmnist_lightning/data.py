"""Fashion-MNIST for training: the tutorial's splits, a tensor batcher, on-device augmentation,
and the LightningDataModule (sources.py finds and verifies the files).

Why not a torch `Dataset` + `DataLoader`: Fashion-MNIST is 47 MB of uint8. Holding each split as
one tensor (on the training device) and building a batch with one indexing op costs microseconds,
where a per-sample PIL pipeline costs seconds per epoch, which is as much as the CNN itself on a
small CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch

from fmnist_lightning.settings import AugmentationSettings, DataSettings
from fmnist_lightning.sources import FashionMNIST, load_fashion_mnist, locate

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28


class Batch(NamedTuple):
    """One batch: float images (B, 1, 28, 28), float one-hot targets (B, 10), int64 labels and
    the samples' indices in their split (so predictions can be written in order, also under DDP)."""

    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


# ----------------------------------------------------------------------------------------------
# On-device augmentation. Each takes a float batch (B, 1, 28, 28) and a generator, and draws all
# its randomness in a few vectorised calls: no per-sample Python.


def random_translate(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by a random (dy, dx) in [-pixels, pixels], filling with zeros."""
    b, _, h, w = x.shape
    shifts = torch.randint(0, 2 * pixels + 1, (2, b), generator=gen, device=gen.device).to(x.device)
    padded = torch.nn.functional.pad(x, (pixels, pixels, pixels, pixels))
    rows = (shifts[0][:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (shifts[1][:, None] + torch.arange(w, device=x.device))[:, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen, device=gen.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erase(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero one random rectangle (2-50% of the area, aspect 0.3-3.3) in a fraction p of the images."""
    b, _, h, w = x.shape
    draws = torch.rand(5, b, generator=gen, device=gen.device).to(x.device)
    area = (0.02 + 0.48 * draws[0]) * h * w
    aspect = torch.exp(np.log(0.3) + (np.log(1 / 0.3) - np.log(0.3)) * draws[1])
    eh = torch.sqrt(area * aspect).clamp(1, h).long()
    ew = torch.sqrt(area / aspect).clamp(1, w).long()
    top = (draws[2] * (h - eh + 1)).long()
    left = (draws[3] * (w - ew + 1)).long()
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (
        (ys >= top[:, None, None])
        & (ys < (top + eh)[:, None, None])
        & (xs >= left[:, None, None])
        & (xs < (left + ew)[:, None, None])
        & (draws[4] < p)[:, None, None]
    )
    return x.masked_fill(inside[:, None], 0.0)


@dataclass(frozen=True)
class Augment:
    """Which on-device augmentations to apply to training batches."""

    translate: int = 0
    hflip: bool = False
    erase_p: float = 0.0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.translate:
            x = random_translate(x, self.translate, gen)
        if self.hflip:
            x = random_hflip(x, gen)
        if self.erase_p > 0:
            x = random_erase(x, self.erase_p, gen)
        return x

    @property
    def active(self) -> bool:
        return bool(self.translate or self.hflip or self.erase_p > 0)


# ----------------------------------------------------------------------------------------------


class TensorBatches:
    """Batches of one split, built by indexing tensors: an iterable Lightning accepts as a loader.

    Yields `Batch`es: images in [0, 1], targets label-smoothed if asked. (Standardisation is the
    model's first step, so a checkpoint or an exported model carries its own preprocessing.)

    Under DDP, rank r of w takes positions r, r+w, r+2w, ... of the epoch's order, so the ranks'
    shards are disjoint. For training each rank takes the same number of samples (the < w left
    over are a different few each epoch, because the order is reshuffled); for evaluation every
    sample is used exactly once and ranks may differ by one sample.

    It is resumable: `position()` records the epoch and how many batches were served, so a run
    interrupted mid-epoch continues with the very next batch (the data module saves it in
    checkpoints).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = False,
        label_smoothing: float = 0.0,
        augment: Augment | None = None,
        device_fn: Callable[[], torch.device] | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.even_shards = rank, world_size, even_shards
        self.label_smoothing = label_smoothing
        self.augment = augment or Augment()
        self.device_fn = device_fn or (lambda: torch.device("cpu"))
        self.epoch = 0
        self._served = 0  # batches handed out in the current epoch
        self._skip = 0  # batches to skip on the next iteration (after a mid-epoch resume)

    # Lightning calls `loader.sampler.set_epoch(epoch)` on each loader at the start of every epoch;
    # pointing `sampler` at ourselves lets the epoch reach us through that standard hook. Lightning
    # also inspects `batch_sampler` when it sees a `sampler`; we have none.
    batch_sampler = None

    @property
    def sampler(self) -> TensorBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self._served}

    def restore(self, position: dict[str, int]) -> None:
        """Continue from `position`: the next iteration of that epoch skips the batches served."""
        self.epoch, self._skip = int(position["epoch"]), int(position["served"])

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.even_shards:
            order = order[: n - n % self.world_size]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.labels)
        per_rank = n // self.world_size if self.even_shards else len(range(self.rank, n, self.world_size))
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        # A generator: the body (and so the epoch's order) runs at the first next(), after
        # Lightning has called set_epoch, not when iter() is called.
        device = self.device_fn()
        if self.images.device != device:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        order = self.indices().to(device)
        skip, self._skip = self._skip, 0
        self._served = skip
        starts = range(skip * self.batch_size, len(order), self.batch_size)
        for number, first in enumerate(starts, start=skip + 1):
            self._served = number
            yield self.make_batch(order[first : first + self.batch_size], number)

    def make_batch(self, idx: torch.Tensor, batch_number: int) -> Batch:
        x = to_float_images(self.images[idx])
        if self.augment.active:
            # Randomness keyed by (seed, epoch, batch): reproducible and unchanged by a resume.
            gen = torch.Generator(device=x.device).manual_seed(
                hash((self.seed, self.epoch, batch_number, self.rank)) & 0x7FFF_FFFF
            )
            x = self.augment(x, gen)
        y = self.labels[idx]
        return Batch(x, one_hot(y, self.label_smoothing), y, idx)


def to_float_images(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28) as the network takes them: float (N, 1, 28, 28) in [0, 1]. The one
    place pixels become inputs: training batches, evaluation, `predict`, export and the benchmark."""
    return pixels.unsqueeze(1).float().div_(255.0)


def one_hot(labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Float one-hot rows (B, 10); with smoothing s the true class gets 1-s+s/10, others s/10."""
    targets = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    if smoothing:
        targets = targets * (1.0 - smoothing) + smoothing / NUM_CLASSES
    return targets


@dataclass
class SplitSummary:
    images_shape: tuple[int, ...]  # as the tutorial shows it: (N, 28, 28, 1)
    targets_shape: tuple[int, ...]  # one-hot: (N, 10)
    pixel_min: float  # after rescaling to [0, 1]
    pixel_max: float
    per_class: list[int]  # images of each class, in CLASS_NAMES order


def summarize(dm: FashionMNISTDataModule) -> dict[str, SplitSummary]:
    """What `fmnist data` shows of each split of a set-up data module."""
    summary = {}
    for split in ("train", "val", "test"):
        images, labels = dm.split(split)
        summary[split] = SplitSummary(
            images_shape=(*images.shape, 1),
            targets_shape=(len(labels), NUM_CLASSES),
            pixel_min=float(images.min()) / 255.0,
            pixel_max=float(images.max()) / 255.0,
            per_class=labels.bincount(minlength=NUM_CLASSES).tolist(),
        )
    return summary


def first_of_each_class(labels: torch.Tensor) -> list[int]:
    """Index of the first image of each class, in CLASS_NAMES order."""
    return [int((labels == k).nonzero()[0]) for k in range(NUM_CLASSES)]


class FashionMNISTDataModule(L.LightningDataModule):
    """The tutorial's splits: val = first `val_size` training images, train = the rest, test = official 10k.

    Its parameters are the data and augmentation settings by name, with what training adds (the
    batch sizes and the seed): `from_settings` passes those sections whole."""

    def __init__(
        self,
        *,
        data_dir: str | Path,
        offline: bool,
        val_size: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        augment: bool,
        random_erasing: float,
        label_smoothing: float,
    ) -> None:
        super().__init__()
        self.data_dir, self.offline, self.val_size = Path(data_dir), offline, val_size
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.augment = Augment(translate=2 if augment else 0, hflip=augment, erase_p=random_erasing)
        self.label_smoothing = label_smoothing
        self.data: FashionMNIST | None = None
        self._train: TensorBatches | None = None
        self._resume_position: dict[str, int] | None = None

    @classmethod
    def from_settings(
        cls,
        data: DataSettings,
        eval_batch_size: int,
        batch_size: int = 1,
        augmentation: AugmentationSettings | None = None,
        seed: int = 0,
    ) -> FashionMNISTDataModule:
        """The data section, and what training adds: its batch size, augmentation and seed (the
        defaults suit evaluation, which draws no training batches)."""
        aug = augmentation or AugmentationSettings()
        return cls(
            **data.model_dump(), **aug.model_dump(), batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed
        )

    def prepare_data(self) -> None:
        # Runs once per node before setup: the only place that may download.
        locate(self.data_dir, self.offline)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = load_fashion_mnist(self.data_dir, offline=True if self.trainer else self.offline)

    def train_stats(self) -> tuple[float, float]:
        """Pixel mean and std of the training split (in [0, 1] units), for standardisation."""
        train = self.split("train")[0].double() / 255.0
        return float(train.mean()), float(train.std())

    @property
    def source(self) -> str:
        return self.data.source if self.data is not None else "not loaded"

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of `train`, `val` or `test` (call `setup()` first)."""
        if self.data is None:
            self.setup()
        assert self.data is not None
        d, v = self.data, self.val_size
        splits = {
            "train": (d.train_images[v:], d.train_labels[v:]),
            "val": (d.train_images[:v], d.train_labels[:v]),
            "test": (d.test_images, d.test_labels),
        }
        return splits[name]

    def _batches(self, name: str, **kwargs: Any) -> TensorBatches:
        images, labels = self.split(name)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        device_fn = (lambda: trainer.strategy.root_device) if trainer else None
        return TensorBatches(
            images,
            labels,
            rank=rank,
            world_size=world,
            device_fn=device_fn,
            **kwargs,
        )

    # Lightning saves and restores a data module's state_dict in checkpoints. Resuming goes through
    # here rather than a loader's own state_dict: Lightning loads loader states only when it creates
    # the loader after restoring, which a schedule sized by `estimated_stepping_batches` prevents.
    def state_dict(self) -> dict[str, Any]:
        return {"train_position": self._train.position() if self._train else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = state_dict.get("train_position")

    def train_dataloader(self) -> TensorBatches:
        # --overfit-batches must see the same batches every epoch (Lightning turns off shuffling
        # only in DataLoaders).
        overfit = self.trainer is not None and getattr(self.trainer, "overfit_batches", 0) > 0  # set at run time
        self._train = self._batches(
            "train",
            batch_size=self.batch_size,
            shuffle=not overfit,
            seed=self.seed,
            even_shards=True,
            label_smoothing=self.label_smoothing,
            augment=self.augment,
        )
        if self._resume_position:
            self._train.restore(self._resume_position)
            self._resume_position = None
        return self._train

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", batch_size=self.eval_batch_size)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", batch_size=self.eval_batch_size)
