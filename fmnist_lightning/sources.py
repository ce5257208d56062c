"""Where the Fashion-MNIST files come from, and proof that they are the official ones.

In order: `data_dir` (flat, or torchvision's `FashionMNIST/raw/` layout, gzipped or not), Debian's
`dataset-fashion-mnist` package, then torchvision's download (unless offline). Every file is
checked against pinned checksums before use.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist_lightning.errors import DataError, UsageError
from fmnist_lightning.hardware import is_global_zero

log = logging.getLogger(__name__)

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
