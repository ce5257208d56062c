"""Checkpoints: reading and validating the ones this package wrote, and writing them atomically."""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fmnist_lightning.errors import CheckpointError, FmnistError
from fmnist_lightning.model import CHECKPOINT_FORMAT, FashionClassifier
from fmnist_lightning.runs import BEST_CHECKPOINT


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by this package onto the CPU, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .ckpt file (e.g. {path / BEST_CHECKPOINT})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        # weights_only: a checkpoint is data; never run code from a file the user points us at.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a PyTorch file ({reason})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    ours = ckpt.get("fmnist_lightning")
    if not isinstance(ours, dict) or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} was not written by fmnist-lightning (another program's checkpoint)")
    if ours.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {ours.get('format')}, this version reads format {CHECKPOINT_FORMAT}"
        )
    return ckpt


def load_classifier(path: Path) -> FashionClassifier:
    """Rebuild the trained model (the right network and dropout variant) from a checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        model = FashionClassifier(**ckpt["hyper_parameters"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} holds a model this version cannot rebuild ({str(exc).splitlines()[0][:160]})"
        ) from None
    return model.eval()


def checkpoint_epoch(path: Path) -> int:
    """Epochs whose training had finished when the checkpoint was written."""
    progress = read_checkpoint(path).get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", 0))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename it into place; read them onto the CPU.

    A process killed mid-save (kill -9, power loss) leaves the previous checkpoint intact, never
    a half-written one; a full disk is a clear error and also keeps the previous file.

    Loading keeps every tensor on the CPU, whatever device saved it (Lightning's default does the
    same; this says so where it matters): a DDP rank resuming a checkpoint saved on cuda:0 must not
    create a context on GPU 0. Lightning moves the restored state to each rank's own device.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-save
                stale.unlink(missing_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise FmnistError(
                    f"disk full while saving {path}; the previous checkpoint is intact. "
                    "Free some space, then continue with --resume"
                ) from None
            raise FmnistError(f"cannot save checkpoint {path}: {exc.strerror}") from None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # torch.load hands each storage to map_location already deserialised on the CPU; returning
        # it as is keeps it there, whatever device the checkpoint names.
        return super().load_checkpoint(path, map_location=lambda storage, location: storage, weights_only=weights_only)
