"""Every bad input gets one clear line on stderr, the right exit code, no traceback, and leaves
the output folder untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _bad_files(tmp: Path) -> dict[str, Path]:
    """Broken configs and checkpoints, written once per test."""
    files = {
        "folder": tmp / "a-folder",
        "empty.yaml": tmp / "empty.yaml",
        "malformed.yaml": tmp / "malformed.yaml",
        "unknown.yaml": tmp / "unknown.yaml",
        "wrongtype.yaml": tmp / "wrongtype.yaml",
        "empty.ckpt": tmp / "empty.ckpt",
        "random.ckpt": tmp / "random.ckpt",
        "other-program.ckpt": tmp / "other-program.ckpt",
        "a-file": tmp / "a-file",
    }
    files["folder"].mkdir()
    files["empty.yaml"].write_text("")
    files["malformed.yaml"].write_text("max_epochs: [1, 2\nlr: 0.1\n")
    files["unknown.yaml"].write_text("max_epochs: 2\nlearning_rate: 0.1\n")
    files["wrongtype.yaml"].write_text("max_epochs: two\n")
    files["empty.ckpt"].write_bytes(b"")
    files["random.ckpt"].write_bytes(bytes(range(256)) * 64)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, files["other-program.ckpt"])
    files["a-file"].write_text("not a folder")
    return files


FIT_CASES = [
    # (arguments after `fit`, exit code, text the one error line must contain)
    (["--max-epochs", "0"], 2, "max_epochs: Input should be greater than or equal to 1, got 0 (from --max-epochs)"),
    (["--batch-size", "-4"], 2, "batch_size: Input should be greater than 0, got -4 (from --batch-size)"),
    (["--batch-size", "1.5"], 2, "--batch-size"),
    (["--lr", "-0.1"], 2, "lr: Input should be greater than 0, got -0.1 (from --lr)"),
    (["--lr", "0"], 2, "lr: Input should be greater than 0, got 0.0 (from --lr)"),
    (["--lr", "nan"], 2, "lr: Input should be a finite number, got nan (from --lr)"),
    (["--dropout-conv", "-0.1"], 2, "dropout_conv: Input should be greater than or equal to 0, got -0.1"),
    (["--dropout-dense", "1"], 2, "dropout_dense: Input should be less than 1, got 1.0"),
    (["--seed", "-1"], 2, "seed: Input should be greater than or equal to 0, got -1"),
    (["--seed", "4294967296"], 2, "seed: Input should be less than or equal to 4294967295, got 4294967296"),
    (["--devices", "0"], 2, "devices: Input should be 'auto', a count >= 1 or a list like '0,1', got '0'"),
    (["--precision", "fp8"], 2, "--precision"),
    (["--strategy", "horovod"], 2, "--strategy"),
    (["--config", "{missing}"], 2, "does not exist"),
    (["--config", "{folder}"], 2, "is a folder"),
    (["--config", "{empty.yaml}"], 2, "is empty"),
    (["--config", "{malformed.yaml}"], 2, "not valid YAML"),
    (["--config", "{unknown.yaml}"], 2, "unknown setting 'learning_rate'"),
    (["--config", "{wrongtype.yaml}"], 2, "max_epochs: Input should be a valid integer, got 'two'"),
    (["--resume"], 2, "cannot resume"),
    (["--out", "{a-file}/run"], 1, "cannot create output folder"),
]
if not torch.cuda.is_available():
    FIT_CASES.append((["--gpus", "1"], 2, "no GPU is visible"))

CKPT_CASES = [
    ("{missing}", "does not exist"),
    ("{folder}", "is a folder"),
    ("{empty.ckpt}", "is empty"),
    ("{truncated}", "truncated, corrupt or not a PyTorch file"),
    ("{random.ckpt}", "truncated, corrupt or not a PyTorch file"),
    ("{other-program.ckpt}", "not written by fmnist-lightning"),
]


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    """Replace {name} placeholders with the paths of the broken files."""
    filled = []
    for arg in args:
        for name, path in files.items():
            arg = arg.replace("{" + name + "}", str(path))
        filled.append(arg)
    return filled


def _assert_one_clear_line(code: int, err: str, expected_code: int, text: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert text in lines[0], err


@pytest.fixture
def existing_run(trained_run: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of a real run folder, and a snapshot of its files to prove nothing changed."""
    import shutil

    run = tmp_path / "existing-run"
    shutil.copytree(trained_run, run)
    return run, _snapshot(run)


@pytest.mark.parametrize(("args", "code", "text"), FIT_CASES, ids=[" ".join(c[0]) for c in FIT_CASES])
def test_fit_bad_input(args: list[str], code: int, text: str, cli, tmp_path: Path, existing_run) -> None:
    run, before = existing_run
    files = {**_bad_files(tmp_path), "missing": tmp_path / "missing.yaml"}
    out_args = [] if "--out" in args else ["--out", str(run)]
    if "--resume" in args:  # a run folder without last.ckpt
        (run / "checkpoints" / "last.ckpt").unlink()
        before = _snapshot(run)
    result = cli("fit", "--offline", *_fill(args, files), *out_args)
    _assert_one_clear_line(*result[::2], code, text)
    assert _snapshot(run) == before


@pytest.mark.parametrize(("ckpt", "text"), CKPT_CASES, ids=[c[0].strip("{}") for c in CKPT_CASES])
@pytest.mark.parametrize("command", ["test", "predict-samples"])
def test_bad_checkpoint(command: str, ckpt: str, text: str, cli, tmp_path: Path, trained_run: Path) -> None:
    files = {**_bad_files(tmp_path), "missing": tmp_path / "missing.ckpt", "truncated": tmp_path / "truncated.ckpt"}
    good = (trained_run / "checkpoints" / "best.ckpt").read_bytes()
    files["truncated"].write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    result = cli(command, "--ckpt", _fill([ckpt], files)[0], "--offline", "--out", out)
    _assert_one_clear_line(*result[::2], 1, text)
    assert not out.exists()


def test_checkpoint_of_another_model_is_refused(cli, tmp_path: Path, trained_run: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["state_dict"] = {k.replace("net.", "backbone."): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "other-model.ckpt")
    result = cli("test", "--ckpt", tmp_path / "other-model.ckpt", "--offline", "--out", tmp_path / "o")
    _assert_one_clear_line(*result[::2], 1, "holds a model this version cannot rebuild")


@pytest.mark.parametrize("num", ["0", "101"])
def test_predict_samples_num_out_of_range(num: str, cli, trained_run: Path) -> None:
    result = cli("predict-samples", "--ckpt", trained_run / "checkpoints" / "best.ckpt", "--num", num)
    _assert_one_clear_line(*result[::2], 2, "--num must be between 1 and 100")


@pytest.mark.parametrize("command", ["test", "predict-samples"])
def test_output_folder_that_cannot_be_made_fails_before_evaluating(command: str, cli, trained_run, tmp_path) -> None:
    (tmp_path / "a-file").write_text("x")
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    result = cli(command, "--ckpt", ckpt, "--offline", "--out", tmp_path / "a-file" / "out")
    _assert_one_clear_line(*result[::2], 1, "cannot create output folder")


def test_fit_that_fails_before_training_leaves_no_trace(cli, tmp_path: Path, monkeypatch) -> None:
    from fmnist_lightning.data import FashionMNISTDataModule
    from fmnist_lightning.errors import DataError

    def no_data(*args: object, **kwargs: object) -> None:
        raise DataError("Fashion-MNIST not found (simulated)")

    monkeypatch.setattr(FashionMNISTDataModule, "from_settings", no_data)
    monkeypatch.chdir(tmp_path)
    result = cli("fit", "--offline", "--out", tmp_path / "new-run")
    _assert_one_clear_line(*result[::2], 1, "not found (simulated)")
    result = cli("fit", "--offline")
    _assert_one_clear_line(*result[::2], 1, "not found (simulated)")
    assert not (tmp_path / "new-run").exists()
    assert not any((tmp_path / "runs").iterdir())  # no empty numbered folder left behind


@pytest.mark.parametrize("where", ["before the Trainer", "inside the Trainer"])
def test_ctrl_c_before_training_starts_exits_130_and_leaves_no_trace(
    where: str, cli, tmp_path: Path, monkeypatch
) -> None:
    from fmnist_lightning.data import FashionMNISTDataModule

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as Ctrl-C while the data loads

    if where == "before the Trainer":
        monkeypatch.setattr(FashionMNISTDataModule, "from_settings", interrupted)
    else:  # Lightning catches it there and calls exit(1)
        monkeypatch.setattr(FashionMNISTDataModule, "setup", interrupted)
    code, out, err = cli("fit", "--offline", "--out", tmp_path / "new-run")
    assert code == 130 and err.strip() == "interrupted: stopped by Ctrl-C" and "Traceback" not in out + err
    assert not (tmp_path / "new-run").exists()


def test_bench_without_paths_is_refused(cli) -> None:
    _assert_one_clear_line(
        *cli("bench", "--paths", ",")[::2],
        2,
        "paths: Tuple should have at least 1 item after validation, not 0 (choose from raw, fmnist, typical, "
        "fmnist-fast), got () (from --paths)",
    )


def test_out_holding_another_run_is_refused(cli, existing_run) -> None:
    run, before = existing_run
    result = cli("fit", "--offline", "--out", run)
    _assert_one_clear_line(*result[::2], 2, "already holds a run; use --resume")
    assert _snapshot(run) == before


def test_resume_below_checkpoint_epoch_is_refused(cli, existing_run) -> None:
    run, before = existing_run  # the trained run finished 2 epochs
    result = cli("fit", "--offline", "--out", run, "--resume", "--max-epochs", "1")
    _assert_one_clear_line(*result[::2], 2, "--max-epochs 1 is below the 2 epochs")
    assert _snapshot(run) == before


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    args = [sys.executable, "-m", "fmnist_lightning", "--debug", "test", "--ckpt", str(tmp_path / "missing.ckpt")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import errno

    from fmnist_lightning.checkpoints import AtomicCheckpointIO
    from fmnist_lightning.errors import FmnistError

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(FmnistError, match="disk full while saving .*previous checkpoint is intact"):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
