"""Time to accuracy (issue 30): `--stop-at-val-acc` stops a run once validation accuracy reaches a
target and says when, and `fmnist results` reads time-to-accuracy rows back from run folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import EarlyStopping

from fmnist_lightning.hardware import resolve_hardware
from fmnist_lightning.runs import read_metrics
from fmnist_lightning.settings import Settings
from fmnist_lightning.training import build_trainer, run_fit
from tests.helpers import TINY, TINY_CPU

# Enough steps that the first validation is well above chance, few enough to take seconds.
SHORT = {**TINY, "max_epochs": 3, "limit_train_batches": 30, "limit_val_batches": 2}


def _stoppers(tmp_path: Path, **settings: Any) -> list[EarlyStopping]:
    s = Settings(accelerator="cpu", progress=False, **settings)
    trainer = build_trainer(s, resolve_hardware(s.hardware), tmp_path)
    return [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]


def test_the_target_is_lightnings_stopping_threshold(tmp_path: Path) -> None:
    (alone,) = _stoppers(tmp_path, stop_at_val_acc=0.9)
    assert (alone.monitor, alone.mode, alone.stopping_threshold) == ("val/acc", "max", 0.9)
    # With patience on the same metric, one callback does both (two alike would share a state key).
    (both,) = _stoppers(tmp_path, stop_at_val_acc=0.9, early_stopping_patience=2)
    assert (both.stopping_threshold, both.patience) == (0.9, 2)
    on_loss = _stoppers(tmp_path, stop_at_val_acc=0.9, early_stopping_patience=2, early_stopping_monitor="val/loss")
    assert sorted((c.monitor, c.stopping_threshold, c.patience) for c in on_loss) == [
        ("val/acc", 0.9, 2**31),
        ("val/loss", None, 2),
    ]
    assert not _stoppers(tmp_path)


def test_fit_stops_at_the_target_and_says_when(real_data: None, tmp_path: Path) -> None:
    result = run_fit(Settings(**SHORT, stop_at_val_acc=0.5), out=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 1 and rows[0]["val/acc"] >= 0.5  # 3 epochs asked for; the first reached it
    assert result.stopped_early_after == 1 and "val/acc reached 0.5" in result.stop_reason
    assert result.target_reached == (1, pytest.approx(rows[0]["train_time_s"]))
    # Out of reach: all epochs run, and the summary says it was not reached.
    missed = run_fit(Settings(**{**SHORT, "max_epochs": 2}, stop_at_val_acc=0.999), out=tmp_path / "missed")
    assert missed.epochs == 2 and missed.stopped_early_after is None and missed.target_reached is None


def test_the_fit_summary_gives_the_time_to_the_target(real_data: None, tmp_path: Path, cli: Any) -> None:
    out = tmp_path / "run"
    code, stdout, err = cli(
        "fit", *TINY_CPU, "--max-epochs", "3", "--limit-train-batches", "30", "--stop-at-val-acc", "0.5", "--out", out
    )
    assert code == 0, err
    assert "stopped early" in stdout and "after epoch 1: val/acc reached 0.5" in stdout
    assert "reached at epoch 1, after" in stdout and "training minutes" in stdout


def _fit_and_test(cli: Any, out: Path, *options: str) -> None:
    code, _, err = cli("fit", *TINY_CPU, "--limit-train-batches", "20", "--out", out, *options)
    assert code == 0, err
    code, _, err = cli("test", "--ckpt", out / "checkpoints" / "best.ckpt", "--out", out, "--offline")
    assert code == 0, err


def test_results_pool_the_seeds_of_a_recipe(real_data: None, tmp_path: Path, cli: Any) -> None:
    runs = tmp_path / "runs"
    for seed in (1, 2):
        _fit_and_test(cli, runs / f"short-seed{seed}", "--seed", str(seed))
    _fit_and_test(cli, runs / "other-seed1", "--seed", "1", "--lr", "0.002")  # another recipe
    code, stdout, err = cli(
        "results", *sorted(runs.iterdir()), "--targets", "0.5,0.99", "--json", tmp_path / "rows.json"
    )
    assert code == 0, err
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert sorted(rows) == ["other", "short"] and rows["short"]["seeds"] == [1, 2]
    for row in rows.values():
        folders = [Path(run) for run in row["runs"]]
        accuracies = [json.loads((f / "report.json").read_text())["accuracy"] for f in folders]
        assert row["test_acc"] == accuracies
        assert row["test_acc_mean"] == pytest.approx(sum(accuracies) / len(accuracies))
        minutes = [sum(r["train_time_s"] for r in read_metrics(f / "metrics.csv")) / 60 for f in folders]
        assert row["train_minutes"] == pytest.approx(minutes)
        assert row["minutes_to_val_acc"]["0.99"] == [None] * len(folders)  # never reached
        reached = row["minutes_to_val_acc"]["0.5"]
        assert all(m == pytest.approx(t) for m, t in zip(reached, minutes))  # one epoch, and it reached 50%
        assert row["commit"] != "unknown" and row["cpu"] != "unknown"  # config.yaml records both
        assert row["precision"].split()[0] in ("32-true", "bf16-mixed")
    assert "short" in stdout and "other" in stdout and "Time to accuracy" in stdout


def test_results_name_a_folder_that_is_not_a_run(tmp_path: Path, cli: Any) -> None:
    code, _, err = cli("results", tmp_path)
    assert code != 0 and f"{tmp_path} is not a trained run folder" in err and "Traceback" not in err
