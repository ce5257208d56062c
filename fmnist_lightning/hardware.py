"""Hardware: turning the hardware section (accelerator, devices, precision, ...) into Trainer arguments, and
knowing whether this process is global rank 0.

torch is imported inside the functions that need it, so the run-folder code (and `fmnist --help`)
can ask "am I rank 0?" without loading it.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist_lightning.errors import UsageError

if TYPE_CHECKING:
    import torch

    from fmnist_lightning.settings import HardwareSettings


def is_global_zero() -> bool:
    """Whether this process is global rank 0, before or after the process group exists.

    - Once torch.distributed is initialised, its rank decides.
    - torchrun sets RANK (the global rank) in every process it starts.
    - Lightning's own launcher sets LOCAL_RANK and NODE_RANK in the processes it starts; a
      SLURM_PROCID inherited from a batch step then says nothing (every child has the same one).
    - srun sets SLURM_PROCID, the global rank, and no LOCAL_RANK.
    - A user's NODE_RANK (multi-node without a launcher yet) counts on its own.
    Lightning's own guess (`rank_zero_only.rank`) ignores NODE_RANK, so on node 1 of a multi-node
    run it believes it is rank 0 until the process group exists.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()) == 0
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"]) == 0 and int(env.get("NODE_RANK", "0")) == 0
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", "0")) == 0


def launcher_restarts() -> int:
    """How many times the launcher has restarted this job: torchrun's --max-restarts, or a SLURM
    requeue (preemption, `scontrol requeue`). 0 for a first start or without such a launcher."""
    env = os.environ
    return int(env.get("TORCHELASTIC_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or 0)


def torchrun_agent() -> str | None:
    """This process's torchrun agent, as "host:pid:start time": the same for every worker the agent
    starts or restarts, another for another launch. None outside torchrun, or without /proc."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    agent = os.getppid()  # torchrun's agent starts its workers as its own child processes
    try:
        started = Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        return None
    return f"{socket.gethostname()}:{agent}:{started}"


def torchrun_world() -> tuple[int, int] | None:
    """(processes per node, processes in all) that torchrun started for this job; None outside it."""
    env = os.environ
    if not all(name in env for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE")):
        return None
    return int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])


def gather_objects(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (just `[value]` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


@dataclass(frozen=True)
class Hardware:
    accelerator: str
    devices: int | list[int]
    strategy: str
    precision: str
    num_nodes: int = 1
    precision_why: str = "asked for"  # how `precision` was chosen, in a few words

    @property
    def precision_described(self) -> str:
        """e.g. "bf16-mixed (the CPU has avx512_bf16)": for config.yaml, the fit summary and bench."""
        return f"{self.precision} ({self.precision_why})"

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "gpu"

    def trainer_kwargs(self) -> dict[str, Any]:
        """The Trainer's hardware arguments (every Trainer this package builds takes these)."""
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "strategy": self.strategy,
            "num_nodes": self.num_nodes,
            "precision": self.precision,
        }


def _parse_devices(devices: str) -> int | list[int] | str:
    if devices == "auto":
        return "auto"
    if "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return int(devices)


CPU_INFO = Path("/proc/cpuinfo")  # Linux; elsewhere the flags are unknown and the CPU stays on fp32
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matrix units / instructions
# Whether `auto` picks bf16-mixed on a CPU with native bf16: on, since docs/RESULTS.md measured it as
# accurate as fp32 (default.yaml, 3 seeds each: -0.09 points; the improved recipe, seed 1: +0.18) and
# 1.42x faster per training step. Off, such a CPU stays on 32-true and says why.
CPU_BF16_BY_DEFAULT = True
# What an explicit bf16-mixed on a CPU without native bf16 says of itself: PyTorch emulates it
# there, and both frameworks then trained about 10x slower than in fp32 (docs/performance.md, M4).
EMULATED_BF16 = "emulated: this CPU has no native bf16, and 32-true trains several times faster"


def _cpuinfo_values(key: str) -> list[str]:
    """The values of CPU_INFO's `key` lines ("flags", "model name"); none where it cannot be read."""
    try:
        text = CPU_INFO.read_text()
    except OSError:
        return []
    return [line.split(":", 1)[-1].strip() for line in text.splitlines() if line.startswith(key)]


def cpu_bf16_flag() -> str | None:
    """The CPU's native-bf16 flag (amx_bf16 or avx512_bf16), or None: without one, PyTorch emulates
    bf16 on the CPU (AVX-512 alone included), which is slower than fp32."""
    flags = {flag for value in _cpuinfo_values("flags") for flag in value.split()}
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def cpu_name() -> str:
    """The CPU's model name, named beside every figure (e.g. "AMD EPYC"); elsewhere what Python knows."""
    names = _cpuinfo_values("model name")
    return names[0] if names else platform.processor()


def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 instructions (else bf16 autocast is emulated and slower)."""
    return cpu_bf16_flag() is not None


def auto_precision(on_gpu: bool) -> tuple[str, str]:
    """What `--precision auto` picks, and why, in a few words.

    GPUs: bf16-mixed where native, else 16-mixed. CPUs: bf16-mixed where the CPU has native bf16
    and CPU_BF16_BY_DEFAULT is on, else 32-true."""
    if on_gpu:
        return (
            ("bf16-mixed", "the GPU has native bf16") if gpu_supports_bf16() else ("16-mixed", "the GPU emulates bf16")
        )
    flag = cpu_bf16_flag()
    if flag is None:
        return "32-true", "the CPU has no native bf16"
    if not CPU_BF16_BY_DEFAULT:
        return "32-true", f"the CPU has {flag}, but bf16's accuracy is not yet shown equal to fp32's"
    return "bf16-mixed", f"the CPU has {flag}"


def gpu_supports_bf16() -> bool:
    """Native bf16 only: V100s and T4s emulate it (slower than 16-mixed), and torch counts that by default."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_hardware(h: HardwareSettings) -> Hardware:
    """Turn the hardware section into concrete Trainer arguments, or raise UsageError."""
    import torch

    accelerator, strategy = h.accelerator, h.strategy
    precision: str = h.precision
    wanted = _parse_devices(h.devices)
    if h.gpus is not None:
        accelerator = "gpu" if h.gpus > 0 else "cpu"
        wanted = h.gpus if h.gpus > 0 else wanted
    visible = torch.cuda.device_count()
    if accelerator == "auto":
        accelerator = "gpu" if visible else "cpu"
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    # `auto` under torchrun: one device per process it started on this node (each process would
    # otherwise train alone, all of them into one run folder).
    launched = torchrun_world()
    auto = launched[0] if launched else (max(visible, 1) if accelerator == "gpu" else 1)
    count = auto if isinstance(wanted, str) else wanted
    n = len(count) if isinstance(count, list) else count
    if launched and n * h.num_nodes != launched[1]:
        per_node, total = launched
        raise UsageError(
            f"torchrun started {total} processes ({per_node} per node), but --devices {n} --num-nodes {h.num_nodes} "
            f"make {n * h.num_nodes}; give --devices {per_node} --num-nodes {total // per_node}"
        )
    if accelerator == "gpu":
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(visible))
        if visible == 0:
            raise UsageError(f"asked for {n} GPU(s) but no GPU is visible; use --gpus 0 or --accelerator cpu")
        if n > visible or (isinstance(count, list) and max(count) >= visible):
            raise UsageError(f"asked for GPUs {count} but only {visible} visible ({names})")
    elif isinstance(count, list):
        raise UsageError("a list of device ids only makes sense for GPUs; give --devices N for CPU processes")
    if strategy == "auto":
        strategy = "ddp" if n * h.num_nodes > 1 else "auto"
    on_gpu = accelerator == "gpu"
    why = "asked for"
    if precision == "auto":
        precision, why = auto_precision(on_gpu)
    elif precision == "bf16-mixed" and not on_gpu and not cpu_supports_bf16():
        why = f"asked for; {EMULATED_BF16}"
    if precision == "16-mixed" and not on_gpu:
        raise UsageError("precision 16-mixed needs a GPU; on the CPU use bf16-mixed or 32-true")
    if precision == "bf16-mixed" and on_gpu and not gpu_supports_bf16():
        raise UsageError("this GPU cannot do bf16-mixed natively; use --precision 16-mixed or 32-true")
    return Hardware(accelerator, count, strategy, precision, h.num_nodes, why)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a timing mark must not run ahead of a GPU (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def close_process_group() -> None:
    """Shut the process group down when a command is done on every rank. Lightning leaves it up;
    gloo's threads still running at interpreter exit can abort a process ("terminate called
    without an active exception"), which torchrun takes for a failed rank."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
