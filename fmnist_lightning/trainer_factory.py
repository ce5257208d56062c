"""The one Trainer factory: every Trainer this package builds (fit, test, lr-find, tune, bench) comes
from `make_trainer`, so the arguments they share are written once.

What every Trainer here shares, and why:
- the resolved hardware (`Hardware.trainer_kwargs`); under torchrun's shared store its DDP builds
  the process group under its generation's own prefix (`GenerationDDPStrategy`), so a restarted
  group connects;
- `use_distributed_sampler=False`: the data module shards its own tensor batches over the ranks;
- `AtomicCheckpointIO`: a checkpoint file is either whole or absent, never half-written;
- no model summary, no sanity validation (fit validates at its first epoch end anyway), no logger
  and no progress bar unless asked for.
`loop_options` passes the run and toolkit settings named like a Trainer argument on to the Trainer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch.distributed.constants import default_pg_timeout

from fmnist_lightning.checkpoints import AtomicCheckpointIO
from fmnist_lightning.elastic import init_generation_group, shares_agent_store
from fmnist_lightning.hardware import Hardware
from fmnist_lightning.settings import RunSettings, ToolkitSettings, arguments_for

# Lightning warnings that do not apply to how this package uses it (regular expressions):
KNOWN_WARNINGS = (
    # We log per epoch only, so the hint about short epochs vs. log_every_n_steps is noise.
    "The number of training batches .* is smaller than the logging interval",
    # Our data module restores the position inside the epoch itself (see its state_dict).
    "You're resuming from a checkpoint that ended before the epoch ended",
    # The validation metrics are computed from states torchmetrics sums over all ranks: every rank
    # logs the same global value, so Lightning's advice to add sync_dist does not apply.
    r"It is recommended to use `self.log\('val/",
    # Under --overfit-batches the data module itself stops shuffling (Lightning cannot, for a loader
    # that is not a DataLoader; evaluation never shuffles), so Lightning's warning is wrong.
    "You requested to overfit but enabled",
)


@contextlib.contextmanager
def known_warnings_hidden() -> Iterator[None]:
    """Inside the block, Lightning's warnings in KNOWN_WARNINGS are hidden; all others show, and
    the process's filters are as before afterwards."""
    with warnings.catch_warnings():
        for message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


class GenerationDDPStrategy(DDPStrategy):
    """Lightning's DDP, with its process group built in torchrun's shared store under a prefix of
    this generation of processes alone (elastic.py says why)."""

    def setup_distributed(self) -> None:
        if not dist.is_initialized():
            self.set_world_ranks()
            device = self.root_device if self.root_device.type != "cpu" else None  # as Lightning passes it
            backend, timeout = self._get_process_group_backend(), self._timeout or default_pg_timeout
            init_generation_group(backend, self.global_rank, self.world_size, timeout, device)
        super().setup_distributed()  # Lightning's own setup, which keeps a process group that exists


def trainer_strategy(strategy: str) -> str | Strategy:
    """What the Trainer gets for `strategy`: DDP under torchrun's shared store is GenerationDDPStrategy."""
    return GenerationDDPStrategy() if strategy == "ddp" and shares_agent_store() else strategy


def make_trainer(hw: Hardware, *, progress: bool = False, **options: Any) -> L.Trainer:
    """A Trainer on `hw` with this package's shared arguments; `options` add to or override them."""
    shared: dict[str, Any] = {
        "logger": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "plugins": [AtomicCheckpointIO()],
        "use_distributed_sampler": False,  # our batches are sharded by the data module itself
        "enable_progress_bar": progress,
    }
    hardware = hw.trainer_kwargs()
    hardware["strategy"] = trainer_strategy(hardware["strategy"])
    with known_warnings_hidden():
        return L.Trainer(**hardware, **{**shared, **options})


def loop_options(run: RunSettings, toolkit: ToolkitSettings) -> dict[str, Any]:
    """The run and toolkit settings that are Trainer arguments by the same name and meaning; the
    others become callbacks (training.py). `profiler` is left to the fit Trainer, which writes its
    report into the run folder."""
    options = {name: value for name, value in arguments_for(L.Trainer, run, toolkit).items() if name != "profiler"}
    options["gradient_clip_val"] = options["gradient_clip_val"] or None  # 0 means off, which Lightning spells None
    return options
