"""Fashion-MNIST: finding and verifying the files, the tutorial's splits, and a tensor batcher.

Where the data comes from, in order: `data_dir` (flat, or torchvision's `FashionMNIST/raw/`
layout, gzipped or not), Debian's `dataset-fashion-mnist` package, then torchvision's download
(unless offline). Every file is checked against pinned checksums before use.

Why not a torch `Dataset` + `DataLoader`: Fashion-MNIST is 47 MB of uint8. Holding each split as
one tensor (on the training device) and building a batch with one indexing op costs microseconds,
where a per-sample PIL pipeline costs seconds per epoch, which is as much as the CNN itself on a
small CPU.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch

from fmnist_lightning.config import Settings
from fmnist_lightning.errors import DataError, UsageError
from fmnist_lightning.hardware import is_global_zero

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
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


@dataclass(frozen=True)
class IdxFile:
    """One official file: its name, the md5 of the official .gz, and the sha256 of its content."""

    name: str
    gz_md5: str
    sha256: str
    size: int


# The official archives' md5 (as torchvision pins them) and the sha256 of the decompressed bytes.
# Debian re-compressed its copy, so its .gz md5 differs while the content hash matches: the content
# hash is what decides; the archive md5 only tells the log which kind of archive it was.
FILES = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47040016,
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60008,
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte",
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7840016,
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte",
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10008,
    ),
}
FIX_HINT = "replace it with a good copy (delete it and run without --offline to download one)"


class Batch(NamedTuple):
    """One batch: float images (B, 1, 28, 28), float one-hot targets (B, 10), int64 labels and
    the samples' indices in their split (so predictions can be written in order, also under DDP)."""

    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


@dataclass
class FashionMNIST:
    """The verified official data as uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


def _candidates(folder: Path, name: str) -> list[Path]:
    return [p for base in (folder, folder / "FashionMNIST" / "raw") for p in (base / name, base / f"{name}.gz")]


def _find_set(folder: Path) -> dict[str, Path] | None:
    """The four files in `folder` (either layout, .gz or not), or None if any is missing."""
    found = {}
    for key, spec in FILES.items():
        path = next((p for p in _candidates(folder, spec.name) if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def read_verified(path: Path, spec: IdxFile) -> bytes:
    """Return the decompressed content of `path` after checking its size and sha256."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    official_archive = False
    if path.suffix == ".gz":
        official_archive = hashlib.md5(raw).hexdigest() == spec.gz_md5
        try:
            content = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is a truncated or corrupt gzip file ({exc}); {FIX_HINT}") from None
    else:
        content = raw
    if len(content) != spec.size:
        raise DataError(
            f"{path} holds {len(content)} bytes of data, expected {spec.size} (truncated or wrong file); {FIX_HINT}"
        )
    digest = hashlib.sha256(content).hexdigest()
    if digest != spec.sha256:
        raise DataError(
            f"{path} fails its checksum: sha256 of its content is {digest[:16]}..., expected "
            f"{spec.sha256[:16]}... (corrupt or not Fashion-MNIST); {FIX_HINT}"
        )
    log.debug("verified %s (%s archive)", path, "official" if official_archive else "re-compressed or raw")
    return content


def parse_idx(content: bytes, path: Path) -> torch.Tensor:
    """Parse IDX bytes (unsigned-byte type) into a uint8 tensor of the shape in its header."""
    if len(content) < 4 or content[0:2] != b"\x00\x00" or content[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file; {FIX_HINT}")
    ndim = content[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(content, dtype=np.uint8, offset=header)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape}, data has {array.size} values; {FIX_HINT}")
    return torch.from_numpy(array.reshape(shape).copy())


def _download(data_dir: Path) -> dict[str, Path]:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file; give a folder to download Fashion-MNIST into")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create --data-dir {data_dir} to download into: {exc.strerror}") from None
    if not os.access(data_dir, os.W_OK):
        raise DataError(f"--data-dir {data_dir} is not writable; download needs a writable folder")
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    log.info("downloading Fashion-MNIST into %s", data_dir / "FashionMNIST" / "raw")
    try:
        TorchvisionFashionMNIST(root=str(data_dir), train=True, download=True)
        TorchvisionFashionMNIST(root=str(data_dir), train=False, download=True)
    except Exception as exc:  # network errors come in many types; the first line says enough
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"Fashion-MNIST not found in {data_dir}, {data_dir / 'FashionMNIST' / 'raw'} or {SYSTEM_DATA_DIR}, and "
            f"the download failed ({reason}); copy the four IDX files into {data_dir} or install Debian's "
            "dataset-fashion-mnist"
        ) from None
    found = _find_set(data_dir)
    if found is None:
        raise DataError(f"download finished but the files are not in {data_dir / 'FashionMNIST' / 'raw'}")
    return found


def locate(data_dir: Path, offline: bool, system_dir: Path = SYSTEM_DATA_DIR) -> tuple[dict[str, Path], str]:
    """Find the four files: data_dir, then the system copy, then a download. Returns paths and a description."""
    if data_dir.exists() and not data_dir.is_dir():
        raise UsageError(
            f"--data-dir {data_dir} is a file, not a folder; give the folder that holds (or will hold) "
            "the Fashion-MNIST files"
        )
    if data_dir.is_dir() and (found := _find_set(data_dir)) is not None:
        return found, f"local copy in {data_dir}"
    if system_dir.is_dir() and (found := _find_set(system_dir)) is not None:
        return found, f"system copy in {system_dir} (Debian dataset-fashion-mnist)"
    if offline:
        raise DataError(
            f"Fashion-MNIST not found (looked in {data_dir}, {data_dir / 'FashionMNIST' / 'raw'} and "
            f"{system_dir}) and --offline forbids downloading; copy the four IDX files into {data_dir} "
            "or install Debian's dataset-fashion-mnist"
        )
    return _download(data_dir), f"downloaded into {data_dir}"


def load_fashion_mnist(data_dir: Path | str, offline: bool) -> FashionMNIST:
    """Find, verify and parse the official files."""
    paths, source = locate(Path(data_dir), offline)
    tensors = {key: parse_idx(read_verified(paths[key], spec), paths[key]) for key, spec in FILES.items()}
    if is_global_zero():  # one line per run, not per DDP process
        log.info("Fashion-MNIST: %s", source)
    return FashionMNIST(source=source, **{key: t.long() if "labels" in key else t for key, t in tensors.items()})


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
        x = self.images[idx].unsqueeze(1).float().div_(255.0)
        if self.augment.active:
            # Randomness keyed by (seed, epoch, batch): reproducible and unchanged by a resume.
            gen = torch.Generator(device=x.device).manual_seed(
                hash((self.seed, self.epoch, batch_number, self.rank)) & 0x7FFF_FFFF
            )
            x = self.augment(x, gen)
        y = self.labels[idx]
        return Batch(x, one_hot(y, self.label_smoothing), y, idx)


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
    """The tutorial's splits: val = first `val_size` training images, train = the rest, test = official 10k."""

    def __init__(
        self,
        *,
        data_dir: str | Path,
        offline: bool,
        val_size: int,
        batch_size: int,
        eval_batch_size: int,
        label_smoothing: float,
        seed: int,
        augment: Augment | None = None,
    ) -> None:
        super().__init__()
        self.data_dir, self.offline, self.val_size = Path(data_dir), offline, val_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.label_smoothing = label_smoothing
        self.augment, self.seed = augment or Augment(), seed
        self.data: FashionMNIST | None = None
        self._train: TensorBatches | None = None
        self._resume_position: dict[str, int] | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> FashionMNISTDataModule:
        return cls(
            data_dir=s.data_dir,
            offline=s.offline,
            val_size=s.val_size,
            batch_size=s.batch_size,
            eval_batch_size=s.eval_batch_size,
            label_smoothing=s.label_smoothing,
            seed=s.seed,
            augment=Augment(translate=2 if s.augment else 0, hflip=s.augment, erase_p=s.random_erasing),
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
