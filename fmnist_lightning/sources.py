"""Where the Fashion-MNIST files come from, and proof that they are the official ones.

In order: `data_dir` (flat, or torchvision's `FashionMNIST/raw/` layout, gzipped or not), Debian's
`dataset-fashion-mnist` package, then a download of the official archives from the mirror
torchvision uses (unless offline; a failed download says why: the host name, the connection, the
HTTP status, a timeout or the checksum). Every file is checked against pinned checksums before use.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import socket
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


# The official archives, where torchvision downloads them from.
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Per connection attempt and per read: a dead or filtered network fails in seconds instead of
# hanging (urllib's default is to wait forever).
DOWNLOAD_TIMEOUT_S = 30.0


class DownloadFailed(Exception):
    """Why one file could not be downloaded, in words (caught by `_download`, never shown alone)."""


def _network_reason(host: str, error: BaseException | str) -> str:
    """What stopped a connection to `host`: the name, the network, the server or the clock."""
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name {host} (no network, or DNS failed: {error.strerror})"
    if isinstance(error, TimeoutError):
        return f"{host} did not answer within {DOWNLOAD_TIMEOUT_S:g} s"
    if isinstance(error, ConnectionRefusedError):
        return f"{host} refused the connection (nothing listens there)"
    if isinstance(error, OSError) and error.strerror:
        return f"cannot connect to {host}: {error.strerror} (no network?)"
    return f"{host}: {error}" if isinstance(error, str) else f"{host}: {type(error).__name__}: {error}"


def _fetch(spec: IdxFile) -> bytes:
    """The official archive of one file from the mirror, checked against its pinned md5."""
    import http.client
    import urllib.error
    import urllib.parse
    import urllib.request

    url = f"{MIRROR}{spec.name}.gz"
    host = urllib.parse.urlsplit(url).netloc
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except urllib.error.HTTPError as exc:
        raise DownloadFailed(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:  # before an answer: the name, the connection
        raise DownloadFailed(_network_reason(host, exc.reason)) from None
    except http.client.IncompleteRead as exc:
        raise DownloadFailed(f"{url}: the connection closed after {len(exc.partial)} bytes") from None
    except (OSError, http.client.HTTPException) as exc:  # while answering: a timeout, a reset
        raise DownloadFailed(_network_reason(host, exc)) from None
    digest = hashlib.md5(data).hexdigest()
    if digest != spec.gz_md5:
        raise DownloadFailed(
            f"{url} sent {len(data)} bytes that fail the checksum (md5 {digest[:12]}..., expected "
            f"{spec.gz_md5[:12]}...), not the official file"
        )
    return data


def _download(data_dir: Path) -> dict[str, Path]:
    """The four official archives into DATA_DIR/FashionMNIST/raw (torchvision's layout), each
    checked before it is written, and written whole (a temporary file renamed into place)."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file; give a folder to download Fashion-MNIST into")
    raw = data_dir / "FashionMNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create --data-dir {data_dir} to download into: {exc.strerror}") from None
    if not os.access(raw, os.W_OK):
        raise DataError(f"--data-dir {data_dir} is not writable; download needs a writable folder")
    log.info("downloading Fashion-MNIST into %s", raw)
    for spec in FILES.values():
        target = raw / f"{spec.name}.gz"
        if target.is_file():  # an earlier download got this far
            continue
        try:
            data = _fetch(spec)
        except DownloadFailed as exc:
            raise DataError(
                f"Fashion-MNIST not found in {data_dir}, {raw} or {SYSTEM_DATA_DIR}, and the download of "
                f"{target.name} failed: {exc}; copy the four IDX files into {data_dir} or install Debian's "
                "dataset-fashion-mnist"
            ) from None
        partial = target.with_name(f"{target.name}.part")
        partial.write_bytes(data)
        partial.replace(target)
    found = _find_set(data_dir)
    if found is None:
        raise DataError(f"download finished but the files are not in {raw}")
    return found


def locate(data_dir: Path, offline: bool, system_dir: Path | None = None) -> tuple[dict[str, Path], str]:
    """Find the four files: data_dir, then the system copy (SYSTEM_DATA_DIR unless given), then a
    download. Returns paths and a description."""
    system_dir = SYSTEM_DATA_DIR if system_dir is None else system_dir
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
