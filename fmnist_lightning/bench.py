"""Training and evaluation throughput of three ways to train the same CNN, in one process and run.

- `raw`: a hand-written PyTorch loop over tensors already in memory (the floor to beat).
- `fmnist`: this project's path: its data module, LightningModule and Trainer as `fmnist fit`
  builds them, progress bar on.
- `typical`: what most tutorials write: torchvision `FashionMNIST` + `ToTensor` + `DataLoader`
  (shuffle, 0 workers) + a default `lightning.Trainer`.
- `fmnist-fast` (optional): the project's fastest setting for the device (`fast_settings`).

The baselines live in `baselines.py`, the timing every path shares in `timing.py`; this module runs
the paths in rounds and summarises them.

Each path runs the same number of steps after the same warm-up; ratios measured in one run survive
a noisy machine, absolute numbers do not. With `repeats` > 1 the paths run in rounds, each round
in a rotated order (so every path takes every position equally often, and a slow minute of a
shared machine is spread over all of them); each ratio is computed within a round, between paths
run minutes apart, and reported as mean +- std over the rounds. Peak RSS is the process's
high-water mark after each path (later paths can only report the same or more).
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch

from fmnist_lightning.baselines import bench_raw, bench_typical, torchvision_copy
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.evaluation import evaluation_engine
from fmnist_lightning.hardware import Hardware, cpu_name, cpu_supports_bf16, resolve_hardware
from fmnist_lightning.inference import ONNX_ENGINE, missing_modules
from fmnist_lightning.runs import check_output_dir, provenance
from fmnist_lightning.settings import BenchConfig, DataSettings, HardwareSettings, Precision, Settings
from fmnist_lightning.timing import PathResult, StepTimer, epochs_for
from fmnist_lightning.trainer_factory import known_warnings_hidden
from fmnist_lightning.training import build_datamodule, build_model, build_trainer

T = TypeVar("T")


def fast_settings(device: str) -> dict[str, Any]:
    """The project's fastest setting for a device: channels_last (the default), bf16 where the
    hardware does it natively. On CPUs, evaluation runs in onnxruntime (fp32 only) when the 'export'
    extra is installed, in batches of 1000 (fewer per-batch steps); PyTorch prefers 250, which
    keeps its unfused activations in cache."""
    if device == "cpu":
        bf16 = cpu_supports_bf16()
        engine = "onnxruntime" if not missing_modules(ONNX_ENGINE) and not bf16 else "torch"
        return {
            "channels_last": True,
            "precision": "bf16-mixed" if bf16 else "32-true",
            "eval_batch_size": 1000 if engine == "onnxruntime" else 250,
            "eval_engine": engine,
        }
    return {"channels_last": True, "precision": "bf16-mixed", "eval_batch_size": 2000}


def bench_hardware(cfg: BenchConfig, precision: Precision) -> Hardware:
    """One device of `cfg.accelerator` in `precision`: every path runs in one process."""
    return resolve_hardware(HardwareSettings(accelerator=cfg.accelerator, devices="1", precision=precision))


@dataclass(frozen=True)
class Entry:
    """One row of the benchmark: a path in one precision."""

    name: str  # the path, or "path@precision" when several precisions are measured
    path: str
    hw: Hardware


def entries(cfg: BenchConfig, hws: Mapping[str, Hardware]) -> list[Entry]:
    """Every path in every precision, each resolved in `hws` (fmnist-fast once: it picks its own
    precision)."""
    several = len(hws) > 1
    rows = []
    for path in cfg.paths:
        for precision, hw in hws.items():
            if path == "fmnist-fast" and precision != cfg.precision[0]:
                continue
            name = f"{path}@{precision}" if several and path != "fmnist-fast" else path
            rows.append(Entry(name, path, hw))
    return rows


def bench_fmnist(
    cfg: BenchConfig, hw: Hardware, workdir: Path, overrides: dict[str, Any] | None = None, name: str = "fmnist"
) -> PathResult:
    """The path `fmnist fit` and `fmnist test` run, built by the functions they use: fit's
    settings (the tutorial CNN with dropout, its layout, batcher and precision), with the
    benchmark's, on the data already here."""
    batches, epochs = epochs_for(cfg)
    s = Settings.model_validate(
        {
            "channels_last": cfg.channels_last,
            "compile": cfg.compile,
            "batch_size": cfg.batch_size,
            "data_dir": cfg.data_dir,
            "offline": True,
            "eval_batch_size": cfg.eval_batch_size,
            "max_epochs": epochs,
            "limit_train_batches": batches,
            "seed": cfg.seed,
            "accelerator": hw.accelerator,
            "devices": "1",
            "precision": hw.precision,
            **(overrides or {}),
        }
    )
    hw = resolve_hardware(s.hardware)  # again: the overrides may change the precision
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(s)
    model = build_model(s, dm)
    timer = StepTimer(cfg)
    # No validation: 0 is Lightning's "off", which `fit` refuses (its best checkpoint needs val/acc).
    trainer = build_trainer(s, hw, workdir / name, extra_callbacks=[timer], limit_val_batches=0)
    with known_warnings_hidden():
        trainer.fit(model, datamodule=dm)
        if s.model.compile:
            trainer.test(model, datamodule=dm, verbose=False)  # compiles the evaluation shapes, untimed
        setup_start = time.perf_counter()
        with evaluation_engine(model, s.evaluation.eval_engine, hw):  # as `fmnist test --eval-engine` (an ONNX export)
            eval_setup_s = time.perf_counter() - setup_start
            trainer.test(model, datamodule=dm, verbose=False)
    result = timer.result(cfg, s.evaluation.eval_batch_size, trainer.strategy.root_device)
    result.eval_setup_s = eval_setup_s
    result.settings = {
        "precision": s.hardware.precision,
        "channels_last": s.model.channels_last,
        "eval_batch_size": s.evaluation.eval_batch_size,
        "eval_engine": s.evaluation.eval_engine,
        "compile": s.model.compile,
    }
    return result


def round_order(paths: Sequence[T], round_index: int) -> list[T]:
    """The paths of one round: rotated by the round's index, so over len(paths) rounds every path
    runs first, second, ... once."""
    k = round_index % len(paths)
    return [*paths[k:], *paths[:k]]


@dataclass
class PathSummary(PathResult):
    """One row over all rounds: the mean of every timing, the highest peak memory, and the standard
    deviation of the two speeds."""

    train_images_per_s_std: float = 0.0
    eval_images_per_s_std: float = 0.0
    rounds: int = 1


@dataclass(frozen=True)
class Ratio:
    """A speed ratio (e.g. "fmnist/raw train"), taken within each round."""

    name: str
    per_round: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_round)

    @property
    def std(self) -> float:
        return _std(self.per_round)

    @property
    def median(self) -> float:
        """Robust to the rounds a neighbour on a shared machine slowed one path down."""
        return statistics.median(self.per_round)


@dataclass(frozen=True)
class Machine:
    platform: str
    cpu: str
    cpu_threads: int
    cpu_bf16: bool  # native bf16 instructions
    gpu: str | None = None  # the GPU the paths ran on

    def to_json(self) -> dict[str, Any]:
        """As the JSON files hold it: a CPU's has no gpu key."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class BenchResult:
    """Everything one benchmark measured, with the machine and the versions."""

    config: BenchConfig
    device: str  # "cpu" or "cuda"
    precisions: dict[str, str]  # what each asked-for precision ("auto" too) became here, and why
    machine: Machine
    versions: dict[str, str]
    date: str
    results: dict[str, PathSummary]  # by row: the path, or "path@precision" with several precisions
    ratios: list[Ratio]
    rounds: list[dict[str, PathResult]]  # each round's rows, in the order they ran

    def to_json(self) -> dict[str, Any]:
        """What `fmnist bench --json` writes (docs/bench/ holds examples; scripts/gpu_check.sh collects them)."""
        return {
            "config": self.config.flat(json=True),
            "resolved": {"device": self.device, "precision": self.precisions},
            "machine": self.machine.to_json(),
            "versions": self.versions,
            "date": self.date,
            "results": {name: asdict(summary) for name, summary in self.results.items()},
            "ratios": {r.name: r.mean for r in self.ratios},
            "ratios_std": {r.name: r.std for r in self.ratios},
            "ratios_median": {r.name: r.median for r in self.ratios},
            "ratios_per_round": {r.name: r.per_round for r in self.ratios},
            "rounds": [{"order": list(m), **{row: asdict(res) for row, res in m.items()}} for m in self.rounds],
        }


def run_benchmark(
    cfg: BenchConfig, on_path: Callable[[str], None] | None = None, json_path: Path | None = None
) -> BenchResult:
    """Run the chosen paths, each in each precision, `cfg.repeats` times; return everything
    measured, with versions and machine: per-round results, means +- std per path, and ratios
    within each round (between paths, and between precisions of a path). With `json_path`, also
    write it there (`BenchResult.to_json`; the folder is checked before the first path runs)."""
    if json_path is not None:
        check_output_dir(json_path.parent)
    hws: dict[str, Hardware] = {
        p: bench_hardware(cfg, p) for p in cfg.precision
    }  # UsageError: a GPU asked for, none visible
    rows = entries(cfg, hws)
    device = torch.device("cuda" if rows[0].hw.on_gpu else "cpu")
    dm = FashionMNISTDataModule.from_settings(DataSettings(data_dir=cfg.data_dir, offline=True), cfg.eval_batch_size)
    dm.setup()
    rounds: list[dict[str, PathResult]] = []
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as tmp:
        workdir = Path(tmp)
        copy = "typical" in cfg.paths
        torchvision_root = torchvision_copy(cfg.data_dir, workdir / "torchvision") if copy else None
        for r in range(cfg.repeats):
            measured: dict[str, PathResult] = {}
            for row in round_order(rows, r):
                if on_path:
                    on_path(row.name if cfg.repeats == 1 else f"{row.name} (round {r + 1} of {cfg.repeats})")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                folder = workdir / f"round-{r + 1}"
                measured[row.name] = _bench_path(row.path, cfg, dm, row.hw, device, folder, torchvision_root)
                # A finished Trainer and its data are reference cycles: free them now, not whenever
                # the cyclic collector next runs, so later paths' peak memory does not include them.
                gc.collect()
            rounds.append(measured)
    per_round_ratios = [_ratios(m, cfg.precision) for m in rounds]
    result = BenchResult(
        config=cfg,
        device=device.type,
        precisions={p: hw.precision_described for p, hw in hws.items()},
        machine=machine(device),
        versions=provenance(),
        date=time.strftime("%Y-%m-%d"),
        results={row.name: _summary([m[row.name] for m in rounds]) for row in rows},
        ratios=[Ratio(name, [r[name] for r in per_round_ratios]) for name in per_round_ratios[0]],
        rounds=rounds,
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _bench_path(
    path: str,
    cfg: BenchConfig,
    dm: FashionMNISTDataModule,
    hw: Hardware,
    device: torch.device,
    workdir: Path,
    torchvision_root: Path | None,
) -> PathResult:
    if path == "raw":
        return bench_raw(cfg, dm, hw, device)
    if path == "fmnist":
        return bench_fmnist(cfg, hw, workdir)
    if path == "typical":
        assert torchvision_root is not None
        return bench_typical(cfg, hw, workdir, torchvision_root)
    return bench_fmnist(cfg, hw, workdir, fast_settings(device.type), name="fmnist-fast")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _summary(runs: list[PathResult]) -> PathSummary:
    """One path over all rounds: the mean of every timing, the highest peak memory, and the
    standard deviation of the two speeds."""
    cuda = [r.cuda_max_allocated_mb for r in runs if r.cuda_max_allocated_mb is not None]
    means = ("train_images_per_s", "warmup_s", "epoch_s", "eval_images_per_s", "eval_setup_s")
    return PathSummary(
        **{
            **asdict(runs[0]),
            **{key: statistics.fmean(getattr(r, key) for r in runs) for key in means},
            "peak_rss_mb": max(r.peak_rss_mb for r in runs),
            "cuda_max_allocated_mb": max(cuda) if cuda else None,
        },
        train_images_per_s_std=_std([r.train_images_per_s for r in runs]),
        eval_images_per_s_std=_std([r.eval_images_per_s for r in runs]),
        rounds=len(runs),
    )


def _ratios(results: dict[str, PathResult], precisions: Sequence[str]) -> dict[str, float]:
    """Speed ratios within one round: the project's paths over the baselines (in the same
    precision), and each path in each further precision over the first."""
    ratios = {}

    def ratio(name: str, top: str, base: str) -> None:
        if top in results and base in results:
            a, b = results[top], results[base]
            ratios[f"{name} train"] = a.train_images_per_s / b.train_images_per_s
            ratios[f"{name} eval"] = a.eval_images_per_s / b.eval_images_per_s

    at = {p: (f"@{p}" if len(precisions) > 1 else "") for p in precisions}
    for p in precisions:
        for base in ("raw", "typical"):
            ratio(f"fmnist/{base}{at[p]}", f"fmnist{at[p]}", f"{base}{at[p]}")
            ratio(f"fmnist-fast/{base}{at[p]}", "fmnist-fast", f"{base}{at[p]}")
    first = precisions[0]
    for p in precisions[1:]:
        for path in ("raw", "fmnist", "typical"):
            ratio(f"{path} {p}/{first}", f"{path}{at[p]}", f"{path}{at[first]}")
    return ratios


def machine(device: torch.device) -> Machine:
    """The machine a measurement ran on: its CPU, threads and native bf16, and the GPU of `device`."""
    return Machine(
        platform=platform.platform(),
        cpu=cpu_name(),
        cpu_threads=torch.get_num_threads(),
        cpu_bf16=cpu_supports_bf16(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )
