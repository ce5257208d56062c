"""Typed settings for a training run, loaded from defaults, a YAML file and the command line.

Settings flow one way: CLI options and YAML keys -> `Settings` -> the library. Each field carries
its own help text, and the CLI builds its `fit` / `compare` options from these fields, so a new
setting is one line here and appears everywhere (YAML, CLI, `config.yaml` of every run).

This module imports neither torch nor lightning: `fmnist --help` must stay fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fmnist_lightning.errors import UsageError

NETWORKS = ("convnet", "convnet-bn", "resnet")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("none", "cosine", "onecycle")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")
EVAL_ENGINES = ("torch", "onnxruntime")
MAX_SEED = 2**32 - 1
PROVENANCE_KEY = "provenance"  # versions and git commit, recorded in each run's config.yaml


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its CLI help text (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Settings:
    """Everything that defines a training run. Field names are the YAML keys and CLI options."""

    # The network. `convnet` is the tutorial's 3-conv CNN.
    network: str = _opt("convnet", "Network architecture.", NETWORKS)
    dropout: bool = _opt(True, "Use dropout (the tutorial's fix for overfitting).")
    dropout_conv: float = _opt(0.25, "Dropout rate after each conv/pool block.")
    dropout_dense: float = _opt(0.3, "Dropout rate after the dense layer.")
    # Optimisation. Defaults are the tutorial's: Adam, lr 1e-3, batch 128.
    max_epochs: int = _opt(12, "Number of training epochs.")
    batch_size: int = _opt(
        128,
        "Images per optimiser step on each device. Under DDP the effective batch is "
        "batch_size x devices x nodes; the learning rate is not rescaled for you.",
    )
    lr: float = _opt(1e-3, "Learning rate (peak rate with --lr-schedule onecycle).")
    optimizer: str = _opt("adam", "Optimiser.", OPTIMIZERS)
    weight_decay: float = _opt(0.0, "Weight decay (decoupled for adamw).")
    lr_schedule: str = _opt("cosine", "Learning-rate schedule over all steps.", LR_SCHEDULES)
    label_smoothing: float = _opt(0.0, "Label smoothing applied to the one-hot targets.")
    # Data.
    data_dir: str = _opt("data", "Folder with the Fashion-MNIST IDX files (or where to download them).")
    offline: bool = _opt(False, "Never download: use --data-dir or the system copy only.")
    val_size: int = _opt(5000, "Validation images: the first N of the official training file.")
    standardize: bool = _opt(False, "Standardise images with the train split's mean and std.")
    augment: bool = _opt(False, "On-device augmentation: random translate +-2 px and horizontal flip.")
    random_erasing: float = _opt(0.0, "Probability of random erasing per training image.")
    # Hardware.
    gpus: int | None = _opt(None, "Shortcut: 0 = CPU, N = N GPUs (N > 1 uses DDP).")
    accelerator: str = _opt("auto", "Lightning accelerator.", ACCELERATORS)
    devices: str = _opt("auto", "Devices per node: a count, 'auto', or a list like '0,1'.")
    strategy: str = _opt("auto", "Distribution strategy (ddp for several devices).", STRATEGIES)
    num_nodes: int = _opt(1, "Number of machines (torchrun or SLURM launches one process per device).")
    precision: str = _opt(
        "auto",
        "Numeric precision. auto: bf16-mixed on GPUs that support it, 16-mixed on other GPUs, 32-true on the CPU.",
        PRECISIONS,
    )
    channels_last: bool = _opt(True, "channels_last memory layout: faster convolutions, same arithmetic.")
    compile: bool = _opt(False, "Compile the network with torch.compile.")
    # Run control.
    seed: int = _opt(42, "Random seed for weights, data order, dropout and augmentation.")
    deterministic: bool = _opt(False, "Use deterministic algorithms (bit-identical CPU reruns).")
    eval_batch_size: int = _opt(250, "Batch size for validation and test (250 keeps a CPU's caches warm).")
    eval_engine: str = _opt(
        "torch",
        "What runs the network at test time: torch, or onnxruntime (CPU, fp32; faster on CPUs, the same "
        "predictions up to float rounding; needs the 'export' extra).",
        EVAL_ENGINES,
    )
    limit_train_batches: float = _opt(1.0, "Lightning's meaning: a fraction (0.5) or a count (10) of batches.")
    limit_val_batches: float = _opt(1.0, "Lightning's meaning: a fraction (0.5) or a count (10) of batches.")
    progress: bool = _opt(True, "Show a progress bar.")

    def validate(self) -> Settings:
        """Raise `UsageError` naming the first impossible value; return self when all is well."""
        checks: list[tuple[bool, str]] = [
            (self.max_epochs >= 1, f"max_epochs must be at least 1, got {self.max_epochs}"),
            (self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be a positive integer, got {self.eval_batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}"),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"weight_decay must be >= 0, got {self.weight_decay}",
            ),
            (0 <= self.dropout_conv < 1, f"dropout_conv must be in [0, 1), got {self.dropout_conv}"),
            (0 <= self.dropout_dense < 1, f"dropout_dense must be in [0, 1), got {self.dropout_dense}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.random_erasing <= 1, f"random_erasing must be in [0, 1], got {self.random_erasing}"),
            (0 <= self.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED}, got {self.seed}"),
            (0 < self.val_size < 60000, f"val_size must be in 1..59999, got {self.val_size}"),
            (self.num_nodes >= 1, f"num_nodes must be at least 1, got {self.num_nodes}"),
            (self.gpus is None or self.gpus >= 0, f"gpus must be 0 or more, got {self.gpus}"),
            (
                _valid_limit(self.limit_train_batches),
                f"limit_train_batches must be a fraction in (0, 1] or a count >= 1, got {self.limit_train_batches}",
            ),
            (
                _valid_limit(self.limit_val_batches),
                f"limit_val_batches must be a fraction in (0, 1] or a count >= 1, got {self.limit_val_batches}",
            ),
            (
                _valid_devices(self.devices),
                f"devices must be 'auto', a count >= 1 or a list like '0,1', got {self.devices!r}",
            ),
        ]
        for name in ("network", "optimizer", "lr_schedule", "accelerator", "strategy", "precision", "eval_engine"):
            allowed = _field(name).metadata["choices"]
            value = getattr(self, name)
            checks.append((value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}"))
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _valid_limit(value: float) -> bool:
    if isinstance(value, int):
        return value >= 1
    return math.isfinite(value) and 0 < value <= 1


def _valid_devices(value: str) -> bool:
    if value == "auto":
        return True
    parts = value.split(",")
    if len(parts) == 1:
        return parts[0].strip().isdigit() and int(parts[0]) >= 1
    return all(p.strip().isdigit() for p in parts if p.strip()) and any(p.strip() for p in parts)


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in fields(Settings) if f.name == name)


def setting_fields() -> list[dataclasses.Field[Any]]:
    """The settings' fields, with resolved Python types in `.type` (for the CLI builder)."""
    hints = typing.get_type_hints(Settings)
    result = []
    for f in fields(Settings):
        f.type = hints[f.name]
        result.append(f)
    return result


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise `UsageError` for a wrong type."""
    hints = typing.get_type_hints(Settings)
    if name not in hints:
        known = ", ".join(f.name for f in fields(Settings))
        raise UsageError(f"unknown setting {name!r}; known settings: {known}")
    kind = hints[name]
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if name.startswith("limit_") and isinstance(value, str):
        value = _parse_number(name, value)
    if name == "devices" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if name.startswith("limit_") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # Lightning's meaning: int = count, float = fraction
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UsageError(f"setting {name!r} must be of type {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _parse_number(name: str, text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {text!r}") from None


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a settings YAML file into a dict of validated-type values, with clear errors."""
    import yaml

    if not path.exists():
        raise UsageError(f"config file {path} does not exist")
    if path.is_dir():
        raise UsageError(f"config file {path} is a folder; give a .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise UsageError(f"config file {path} is empty; put settings in it, e.g. 'max_epochs: 5'")
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of setting: value, not a {type(data).__name__}")
    result = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == PROVENANCE_KEY:
            continue  # written by `fmnist fit` for the record; not a setting
        try:
            result[name] = coerce(name, value)
        except UsageError as exc:
            raise UsageError(f"config file {path}: {exc}") from None
    return result


def resolve_settings(config: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults, then the YAML file, then explicit overrides (CLI options that were given)."""
    values: dict[str, Any] = {}
    if config is not None:
        values.update(load_yaml(config))
    for name, value in (overrides or {}).items():
        values[name] = coerce(name, value)
    return Settings(**values).validate()


def save_yaml(settings: Settings, path: Path, provenance: dict[str, Any] | None = None) -> None:
    """Write the resolved settings (and where they ran: versions, git commit) as YAML."""
    import yaml

    data = settings.to_dict()
    if provenance:
        data[PROVENANCE_KEY] = provenance
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@functools.cache
def provenance() -> dict[str, Any]:
    """Versions and git commit, recorded in each run's config.yaml and checkpoints."""
    import platform
    import subprocess

    import lightning
    import torch

    from fmnist_lightning import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "fmnist_lightning": __version__,
        "torch": str(torch.__version__),
        "lightning": str(lightning.__version__),
        "python": platform.python_version(),
        "git_commit": commit or None,
    }
