"""The benchmark's arithmetic: round order, per-round ratios and their summary, on made-up results;
and its step timer, which must time exactly the steps asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fmnist_lightning.bench import _ratios, _summary, round_order
from fmnist_lightning.hardware import resolve_hardware
from fmnist_lightning.settings import HardwareSettings
from fmnist_lightning.timing import PathResult


def _result(train: float, evaluation: float) -> PathResult:
    return PathResult(
        train_images_per_s=train,
        warmup_s=1.0,
        epoch_s=1.0 + 55000 / train,
        eval_images_per_s=evaluation,
        eval_batch_size=1000,
        eval_setup_s=0.0,
        peak_rss_mb=100.0,
        cuda_max_allocated_mb=None,
    )


def test_rounds_rotate_so_every_path_takes_every_position() -> None:
    paths = ("raw", "fmnist", "typical")
    orders = [round_order(paths, r) for r in range(3)]
    assert orders == [["raw", "fmnist", "typical"], ["fmnist", "typical", "raw"], ["typical", "raw", "fmnist"]]
    for position in range(3):
        assert {order[position] for order in orders} == set(paths)


def test_ratios_are_taken_within_a_round() -> None:
    ratios = _ratios(
        {"raw": _result(2000, 3000), "fmnist": _result(1900, 3300), "typical": _result(1000, 1500)}, ["auto"]
    )
    assert ratios["fmnist/raw train"] == pytest.approx(0.95)
    assert ratios["fmnist/raw eval"] == pytest.approx(1.1)
    assert ratios["fmnist/typical train"] == pytest.approx(1.9)
    assert "fmnist-fast/raw train" not in ratios


def test_with_two_precisions_each_path_gets_its_ratio_between_them() -> None:
    results = {
        "raw@32-true": _result(2000, 3000),
        "raw@bf16-mixed": _result(3000, 4500),
        "fmnist@32-true": _result(1800, 3000),
        "fmnist@bf16-mixed": _result(2700, 4200),
        "fmnist-fast": _result(4000, 9000),
    }
    ratios = _ratios(results, ["32-true", "bf16-mixed"])
    assert ratios["raw bf16-mixed/32-true train"] == pytest.approx(1.5)
    assert ratios["fmnist bf16-mixed/32-true eval"] == pytest.approx(1.4)
    assert ratios["fmnist/raw@bf16-mixed train"] == pytest.approx(0.9)  # paths compared within a precision
    assert ratios["fmnist-fast/raw@32-true train"] == pytest.approx(2.0)
    assert "typical bf16-mixed/32-true train" not in ratios


def test_a_precision_list_measures_every_path_in_each(real_data: None, cli, tmp_path) -> None:
    import json
    import statistics

    out = tmp_path / "bench.json"
    code, stdout, err = cli(
        "bench", "--paths", "raw,fmnist", "--precision", "32-true,bf16-mixed", "--steps", "2", "--warmup-steps", "1",
        "--repeats", "2", "--json", out,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    assert list(result["results"]) == ["raw@32-true", "raw@bf16-mixed", "fmnist@32-true", "fmnist@bf16-mixed"]
    bf16 = resolve_hardware(HardwareSettings(accelerator="cpu", precision="bf16-mixed"))  # emulated or not
    assert result["resolved"]["precision"] == {"32-true": "32-true (asked for)", "bf16-mixed": bf16.precision_described}
    assert len(result["ratios_per_round"]["raw bf16-mixed/32-true train"]) == 2
    per_round = result["ratios_per_round"]["fmnist bf16-mixed/32-true eval"]
    assert result["ratios_median"]["fmnist bf16-mixed/32-true eval"] == statistics.median(per_round)
    rounds = [
        result["rounds"][r][f"fmnist@{p}"]["eval_images_per_s"] for r in range(2) for p in ("bf16-mixed", "32-true")
    ]
    assert per_round == pytest.approx([rounds[0] / rounds[1], rounds[2] / rounds[3]])
    assert "raw bf16-mixed/32-true train" in stdout


def test_summary_is_the_mean_with_the_spread_of_the_rounds() -> None:
    summary = _summary([_result(1000, 2000), _result(3000, 4000)])
    assert summary.train_images_per_s == 2000 and summary.eval_images_per_s == 3000
    assert summary.train_images_per_s_std == pytest.approx(1414.2136, rel=1e-6)
    assert summary.rounds == 2 and summary.peak_rss_mb == 100.0


@pytest.mark.parametrize(
    ("bf16", "onnxruntime", "precision", "engine", "eval_batch_size"),
    [
        (True, True, "bf16-mixed", "torch", 250),  # onnxruntime runs fp32 only: bf16 torch is faster
        (True, False, "bf16-mixed", "torch", 250),
        (False, True, "32-true", "onnxruntime", 1000),
        (False, False, "32-true", "torch", 250),
    ],
    ids=["bf16-cpu", "bf16-cpu-without-onnxruntime", "older-cpu", "older-cpu-without-onnxruntime"],
)
def test_the_fastest_cpu_setting_follows_the_cpu_and_the_installed_engine(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, onnxruntime: bool, precision: str, engine: str, eval_batch_size: int
) -> None:
    from fmnist_lightning import bench

    monkeypatch.setattr(bench, "cpu_supports_bf16", lambda: bf16)
    monkeypatch.setattr(bench, "missing_modules", lambda names: [] if onnxruntime else ["onnxruntime"])
    assert bench.fast_settings("cpu") == {
        "channels_last": True,
        "precision": precision,
        "eval_batch_size": eval_batch_size,
        "eval_engine": engine,
    }


def test_a_miscounted_timing_is_an_error_even_under_python_O() -> None:
    """The timer's check is a real one: `python -O`, which strips asserts, still raises it."""
    code = (
        "import types, torch\n"
        "from fmnist_lightning.timing import StepTimer\n"
        "cfg = types.SimpleNamespace(warmup_steps=1, steps=6, batch_size=8192)\n"
        "timer = StepTimer(cfg)\n"
        "timer.steps = 6  # the fit ended one step early\n"
        "timer.result(cfg, 2500, torch.device('cpu'))\n"
    )
    done = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "RuntimeError: the step timer counted 6 training steps, not 7" in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_steps_past_one_epoch_are_measured_exactly(
    real_data: None, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch 8192 gives 6 full batches an epoch: 1 warm-up + 6 measured steps span two epochs, the
    fit stops right after them, and the timed window holds exactly the 6 (counted here by the
    Trainer's own step count at the timer's marks)."""
    from fmnist_lightning import bench

    timers: list[CountingTimer] = []

    class CountingTimer(bench.StepTimer):
        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            self.epochs: list[int] = []  # the epoch of every training batch
            self.marks: dict[str, int] = {}  # the Trainer's global_step at the timer's marks
            timers.append(self)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
            if self.steps == self.warmup:
                self.marks["timing starts after step"] = trainer.global_step
            super().on_train_batch_start(trainer, pl_module, batch, idx)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, out: Any, batch: Any, idx: int) -> None:
            super().on_train_batch_end(trainer, pl_module, out, batch, idx)
            self.epochs.append(trainer.current_epoch)
            if self.steps == self.total:
                self.marks["timing ends after step"] = trainer.global_step

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.marks["steps trained"] = trainer.global_step

    monkeypatch.setattr(bench, "StepTimer", CountingTimer)
    out = tmp_path / "bench.json"
    args = ("--batch-size", "8192", "--steps", "6", "--warmup-steps", "1", "--eval-batch-size", "2500")
    code, _, err = cli("bench", "--paths", "fmnist", *args, "--json", out)
    assert code == 0, err
    (timer,) = timers
    assert timer.epochs == [0, 0, 0, 0, 0, 0, 1]
    assert timer.marks == {"timing starts after step": 1, "timing ends after step": 7, "steps trained": 7}
    assert json.loads(out.read_text())["config"]["steps"] == 6
