"""Where a training step of `fmnist fit` spends its time, in one process, alternating.

    python scripts/step_profile.py --precision bf16-mixed --rounds 5 --steps 60 --json profile.json

The model, data module, batcher and optimiser are the ones `fmnist fit` builds from its settings
(the defaults, or --config and --set NAME=VALUE), on the CPU. Each round runs two blocks, in
alternating order, of --steps steps after --warmup steps:

- `fit`: the real thing, a Trainer from `training.build_trainer` (validation off), steps timed from
  on_train_batch_start to on_train_batch_end: everything Lightning does per step included;
- `phases`: the same step written out by hand, each part timed apart: the batcher (next batch),
  forward and loss (under autocast, as Lightning's precision plugin runs them), backward, and the
  optimiser (step, zero_grad, the learning-rate scheduler).

Lightning's share is `fit` minus the sum of the phases. Last, one pass under torch.profiler over the
hand-written step gives the time in copies (aten::copy_, aten::_to_copy: autocast's casts, layout
changes) and the slowest operators. A round's blocks are minutes apart at most, so their ratio
survives a noisy machine; the table gives medians over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback

from fmnist_lightning.hardware import cpu_bf16_flag, cpu_name, resolve_hardware
from fmnist_lightning.model import FashionClassifier, build_optimizer
from fmnist_lightning.runs import provenance
from fmnist_lightning.settings import Settings, load_yaml
from fmnist_lightning.trainer_factory import known_warnings_hidden
from fmnist_lightning.training import build_datamodule, build_model, build_trainer

PHASES = ("batcher", "forward", "backward", "optimizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Where a training step of `fmnist fit` spends its time.")
    parser.add_argument("--precision", default="bf16-mixed", choices=("32-true", "bf16-mixed"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="Timed steps per block.")
    parser.add_argument("--warmup", type=int, default=10, help="Untimed steps before each block.")
    parser.add_argument("--config", type=Path, help="A settings YAML, as `fmnist fit --config`.")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="A setting, e.g. compile=true."
    )
    parser.add_argument("--data-dir", default="data", help="Folder with the IDX files (else Debian's).")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for item in args.set:
        name, _, value = item.partition("=")
        given[name] = yaml.safe_load(value)  # numbers and booleans as YAML reads them
    given |= {"precision": args.precision, "accelerator": "cpu", "devices": "1", "offline": True}
    given.setdefault("data_dir", args.data_dir)
    return Settings.model_validate(given)


class StepClock(Callback):
    """Per-step wall time of the steps after `warmup`."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def fit_block(s: Settings, args: argparse.Namespace, workdir: Path) -> float:
    """Median ms per step of the real fit loop."""
    hw = resolve_hardware(s.hardware)
    dm = build_datamodule(s)
    model = build_model(s, dm)
    clock = StepClock(args.warmup)
    steps = args.warmup + args.steps
    trainer = build_trainer(s, hw, workdir, [clock], limit_val_batches=0, limit_train_batches=steps, max_epochs=1)
    with known_warnings_hidden():
        trainer.fit(model, datamodule=dm)
    return 1000 * statistics.median(clock.times)


def autocast_for(precision: str) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()


def hand_step(model: FashionClassifier, s: Settings) -> tuple[Any, torch.optim.Optimizer, Any]:
    """(batch iterator, optimiser, scheduler) as `fmnist fit` makes them, for the hand-written step."""
    dm = build_datamodule(s)
    dm.setup("fit")
    hp = model.hparams
    opt = build_optimizer(hp["optimizer"], model.parameters(), hp["lr"], hp["weight_decay"], torch.device("cpu"))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10**6)
    return iter(dm.train_dataloader()), opt, sched


def phases_block(s: Settings, args: argparse.Namespace) -> dict[str, float]:
    """Median ms per step of each phase of the hand-written step."""
    dm = build_datamodule(s)
    model = build_model(s, dm).train()
    batches, opt, sched = hand_step(model, s)
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        with autocast_for(s.hardware.precision):
            loss = F.cross_entropy(model(batch.images), batch.targets)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        t4 = time.perf_counter()
        if step >= args.warmup:
            for phase, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                times[phase].append(b - a)
    return {phase: 1000 * statistics.median(values) for phase, values in times.items()}


def operator_profile(s: Settings, steps: int = 20) -> dict[str, Any]:
    """torch.profiler over `steps` hand-written steps: ms per step in copies and casts, and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    dm = build_datamodule(s)
    model = build_model(s, dm).train()
    batches, opt, sched = hand_step(model, s)

    def step() -> None:
        batch = next(batches)
        with autocast_for(s.hardware.precision):
            loss = F.cross_entropy(model(batch.images), batch.targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    casts = sum(e.self_cpu_time_total for e in events if e.key in ("aten::_to_copy", "aten::copy_"))
    return {
        "casts_ms": casts / 1000 / steps,
        "top": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps, "calls": e.count} for e in top],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = settings_for(args)
    torch.manual_seed(0)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="step-profile-") as tmp:
        for number in range(args.rounds):
            order = ("fit", "phases") if number % 2 == 0 else ("phases", "fit")
            measured: dict[str, Any] = {}
            for block in order:
                if block == "fit":
                    measured["fit_ms"] = fit_block(s, args, Path(tmp) / f"round{number}")
                else:
                    measured["phases_ms"] = phases_block(s, args)
            measured["lightning_ms"] = measured["fit_ms"] - sum(measured["phases_ms"].values())
            rounds.append(measured)
            print(
                f"round {number + 1}: fit {measured['fit_ms']:.1f} ms/step, phases {measured['phases_ms']}",
                file=sys.stderr,
            )
    ops = operator_profile(s)
    fit_ms = statistics.median(r["fit_ms"] for r in rounds)
    parts = {phase: statistics.median(r["phases_ms"][phase] for r in rounds) for phase in PHASES}
    parts["lightning (fit minus the phases)"] = statistics.median(r["lightning_ms"] for r in rounds)
    result = {
        "cpu": cpu_name(),
        "cpu_bf16": cpu_bf16_flag(),
        "precision": s.hardware.precision,
        "settings": {
            k: v for k, v in s.flat().items() if k in ("network", "dropout", "channels_last", "compile", "batch_size")
        },
        "versions": {k: provenance().get(k) for k in ("git_commit", "torch", "lightning")},
        "fit_ms_per_step": fit_ms,
        "fit_images_per_s": s.optimisation.batch_size / fit_ms * 1000,
        "parts_ms": parts,
        "operators": ops,
        "rounds": rounds,
    }
    print(
        f"{cpu_name()} ({cpu_bf16_flag() or 'no native bf16'}), {s.hardware.precision}, "
        f"{args.rounds} rounds x {args.steps} steps, medians"
    )
    print(f"fit: {fit_ms:.2f} ms per step = {result['fit_images_per_s']:,.0f} img/s")
    for part, ms in parts.items():
        print(f"  {part:<34} {ms:7.2f} ms  {100 * ms / fit_ms:5.1f}%")
    print(f"  {'of which copies and casts (profiler)':<34} {ops['casts_ms']:7.2f} ms")
    print("top operators (self time per step, profiler):")
    for op in ops["top"]:
        print(f"  {op['op']:<40} {op['self_ms_per_step']:7.2f} ms  x{op['calls']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
