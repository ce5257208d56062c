"""Every command end to end on a tiny budget, through the real `fmnist` entry point."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

from fmnist_lightning import __version__
from tests.helpers import TINY_CPU, is_png


def test_version_and_help_do_not_import_torch() -> None:
    code = "import sys; from fmnist_lightning.cli import app; print('torch' in sys.modules, 'lightning' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert imported.stdout.split() == ["False", "False"]
    fmnist = [sys.executable, "-m", "fmnist_lightning"]
    result = subprocess.run([*fmnist, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and __version__ in result.stdout
    result = subprocess.run([*fmnist, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("data", "fit", "test", "predict-samples", "compare"):
        assert command in result.stdout


def test_fit_writes_a_complete_run_folder(real_data: None, cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, err = cli("fit", *TINY_CPU, "--max-epochs", "2", "--no-dropout", "--out", out)
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["max_epochs"] == 2 and config["dropout"] is False
    assert config["provenance"]["torch"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= rows[0].keys()
    assert all(0 <= float(r["val/acc"]) <= 1 for r in rows)
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert is_png(out / "curves.png")
    assert "best val accuracy" in stdout and str(out / "checkpoints" / "best.ckpt") in stdout.replace("\n", "")


def test_default_out_is_a_new_numbered_folder(real_data: None, cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli("fit", *TINY_CPU)[0] == 0
    assert cli("fit", *TINY_CPU)[0] == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["001", "002"]


def test_config_file_then_options(real_data: None, cli, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("max-epochs: 1\nbatch_size: 64\nlr: 2e-3\nweight_decay: 1e-4\n")  # YAML 1.1 reads 2e-3 as text
    out = tmp_path / "run"
    code, _, err = cli("fit", "--config", config, *TINY_CPU, "--lr", "0.003", "--out", out)
    assert code == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["batch_size"] == 64 and saved["lr"] == 0.003 and saved["weight_decay"] == 1e-4


def test_shipped_configs_are_valid() -> None:
    from fmnist_lightning.settings import resolve_settings

    configs = sorted(Path("configs").glob("*.yaml"))
    assert {"default.yaml", "tutorial.yaml", "tutorial-dropout.yaml"} <= {p.name for p in configs}
    tutorial = resolve_settings(Path("configs/tutorial.yaml")).flat()
    assert [tutorial[k] for k in ("dropout", "lr", "batch_size", "max_epochs", "optimizer")] == [
        False,
        1e-3,
        128,
        200,
        "adam",
    ]
    assert resolve_settings(Path("configs/tutorial-dropout.yaml")).model.dropout is True
    for path in configs:
        resolve_settings(path)


def test_test_and_predict_samples(trained_run: Path, cli, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    code, stdout, err = cli("test", "--ckpt", ckpt, "--offline", "--out", tmp_path / "t")
    assert code == 0, err
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert {
        "accuracy",
        "loss",
        "num_samples",
        "per_class",
        "macro_avg",
        "weighted_avg",
        "confusion_matrix",
    } <= report.keys()
    assert report["num_samples"] == 10000 and len(report["per_class"]) == 10
    assert sum(map(sum, report["confusion_matrix"])) == 10000
    assert is_png(tmp_path / "t" / "confusion_matrix.png")
    assert "test accuracy" in stdout

    code, stdout, err = cli("predict-samples", "--ckpt", ckpt, "--offline", "--num", "4", "--out", tmp_path / "p")
    assert code == 0, err
    assert is_png(tmp_path / "p" / "correct.png") and is_png(tmp_path / "p" / "incorrect.png")
    assert "correct (4)" in stdout and "incorrect (4)" in stdout


def test_predict_samples_writes_into_the_run_folder_by_default(copied_run: Path, cli) -> None:
    code, _, err = cli("predict-samples", "--ckpt", copied_run / "checkpoints" / "best.ckpt", "--offline", "--num", "2")
    assert code == 0, err
    assert is_png(copied_run / "correct.png")


def test_compare_trains_both_variants(real_data: None, cli, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", *TINY_CPU, "--out", out)
    assert code == 0, err
    for variant, dropout in (("dropout", True), ("no-dropout", False)):
        assert yaml.safe_load((out / variant / "config.yaml").read_text())["dropout"] is dropout
        assert json.loads((out / variant / "report.json").read_text())["num_samples"] == 10000
    assert is_png(out / "compare.png")
    # The printed table holds the numbers of compare.json, which are those of each variant's report.
    rows = json.loads((out / "compare.json").read_text())
    assert [row["model"] for row in rows] == ["dropout", "no-dropout"]
    for row in rows:
        report = json.loads((out / row["model"] / "report.json").read_text())
        assert row["test_acc"] == report["accuracy"] and row["test_loss"] == report["loss"]
        table_rows = [line.strip().strip("│").split("│") for line in stdout.splitlines() if line.startswith("│")]
        cells = next([c.strip() for c in cells] for cells in table_rows if cells[0].strip() == row["model"])
        expected = [f"{row['test_acc']:.4f}", f"{row['test_loss']:.4f}", str(row["best_epoch"]), f"{row['gap']:+.4f}"]
        assert cells[1:] == expected, stdout


def test_intended_use_lines_run_in_order(real_data: None, cli, tmp_path: Path, monkeypatch) -> None:
    """fit, then test from a folder holding best.ckpt, then a bare predict-samples: the newest run's."""
    import shutil

    monkeypatch.chdir(tmp_path)
    code, _, err = cli("predict-samples")
    assert code == 2
    assert err.strip() == "error: no trained run under runs/: train one first (fmnist fit), or pass --ckpt"
    code, _, err = cli("fit", *TINY_CPU)
    assert code == 0, err
    shutil.copy(tmp_path / "runs" / "001" / "checkpoints" / "best.ckpt", tmp_path / "best.ckpt")
    code, stdout, err = cli("test", "--ckpt", "best.ckpt")
    assert code == 0, err
    assert "test accuracy" in stdout and (tmp_path / "report.json").is_file()  # beside the checkpoint
    code, stdout, err = cli("predict-samples")
    assert code == 0, err
    assert "using runs/001/checkpoints/best.ckpt (the newest run's best checkpoint" in stdout
    assert is_png(tmp_path / "runs" / "001" / "correct.png") and is_png(tmp_path / "runs" / "001" / "incorrect.png")


def test_a_mistyped_setting_is_one_line_before_torch_is_imported(tmp_path: Path) -> None:
    """Every command validates its settings first: a bad value costs a fraction of a second (one
    line, exit 2), not an import of torch and Lightning."""
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 1e-4, high: 1e-2}\n")
    bad = {
        "fit": ["--max-epochs", "-1"],
        "lr-find": ["--max-epochs", "-1"],
        "compare": ["--max-epochs", "-1"],
        "tune": ["--space", str(space), "--max-epochs", "-1"],
        "test": ["--ckpt", "x.ckpt", "--eval-batch-size", "0"],
        "predict-samples": ["--ckpt", "x.ckpt", "--eval-batch-size", "0"],
        "report": [str(tmp_path), "--eval-batch-size", "0"],
        "predict": ["--ckpt", "x.ckpt", "--eval-batch-size", "0", "x.png"],
        "export": ["--ckpt", "x.ckpt", "--format", "onnx", "--val-size", "0"],
        "data": ["--val-size", "0"],
        "bench": ["--steps", "0"],
        "serve": ["--port", "80"],
    }
    code = (
        "import json, sys\n"
        "from fmnist_lightning.cli import main\n"
        "seen = {}\n"
        "for command, args in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        main([command, *args])\n"
        "    except SystemExit as exc:\n"
        "        seen[command] = [exc.code, 'torch' in sys.modules or 'lightning' in sys.modules]\n"
        "print(json.dumps(seen))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(bad)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen == {command: [2, False] for command in bad}, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == len(bad) and all(line.startswith("error: ") for line in errors), result.stderr


def test_debug_shows_lightnings_messages_once(real_data: None, tmp_path: Path) -> None:
    """Lightning's package logger has a console handler of its own; with --debug its messages
    must still be printed once, by ours. Without --debug they are hidden."""
    fit = [sys.executable, "-m", "fmnist_lightning"]
    args = ["fit", "--fast-dev-run", *TINY_CPU, "--logger", "csv"]
    debug = subprocess.run([*fit, "--debug", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert debug.returncode == 0, debug.stderr
    assert debug.stderr.count("GPU available:") == 1, debug.stderr
    quiet = subprocess.run([*fit, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert quiet.returncode == 0 and "GPU available:" not in quiet.stderr, quiet.stderr
