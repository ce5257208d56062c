"""`fmnist tune`: bad search spaces, a real study whose best.yaml reproduces its best trial, and two
workers sharing one study (SQLite on one machine; a real PostgreSQL server as for several machines)."""

from __future__ import annotations

import csv
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fmnist_lightning.errors import UsageError
from fmnist_lightning.settings import Settings, resolve_settings
from fmnist_lightning.space import Param, load_space
from tests.helpers import (
    ROOT,
    TINY_CPU,
    ended_output,
    free_port,
    need,
    pause_env,
    subprocess_env,
    wait_for_pause,
    without_module,
)

SPACE = (
    "lr: {low: 1e-4, high: 1e-2, log: true}\ndropout_conv: {low: 0.0, high: 0.5}\ndropout: {choices: [true, false]}\n"
)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("lrr: {low: 1e-4, high: 1e-2}", "unknown setting 'lrr'; known settings: network, dropout,"),
        ("lr: {low: 1e-2, high: 1e-4, log: true}", "lr: empty range: low 0.01 must be below high 0.0001"),
        ("dropout_conv: {low: 0.1, high: 0.1}", "dropout_conv: empty range: low 0.1 must be below high 0.1"),
        ("batch_size: {low: 32.5, high: 256}", "batch_size takes integers: the range's bounds must be integers"),
        ("dropout: {low: 0, high: 1}", "dropout is a bool setting, not a number: give choices"),
        ("lr: {low: small, high: 1e-2}", "lr: low must be a number, got 'small'"),
        ("batch_size: {choices: [64, 128.0]}", "batch_size: Input should be a valid integer, got 128.0"),
        ("dropout_conv: {low: 0.0, high: 1.5}", "dropout_conv: Input should be less than 1, got 1.5"),
        ("optimizer: {choices: [adam, lion]}", "optimizer: Input should be 'adam', 'adamw' or 'sgd', got 'lion'"),
        ("batch_size: {low: 0, high: 64}", "batch_size: Input should be greater than 0, got 0"),
        ("batch_size: []", "batch_size: choices must be a non-empty list of values, got []"),
        ("batch_size: [[64, 128]]", "batch_size: each choice must be a single value, got [64, 128]"),
        ("batch_size: [64, {low: 1}]", "batch_size: each choice must be a single value, got {'low': 1}"),
        ("batch_size: [64, 12.5]", "batch_size: Input should be a valid integer, got 12.5"),
    ],
)
def test_a_bad_space_is_one_line_and_exit_2(space: str, message: str, cli, tmp_path: Path) -> None:
    need("optuna", "tune")
    path = tmp_path / "space.yaml"
    path.write_text(space + "\n")
    code, _, err = cli("tune", "--space", path, "--trials", "2", "--out", tmp_path / "study", *TINY_CPU)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: space file {path}: ") and message in lines[0], lines[0]
    assert not (tmp_path / "study").exists()  # refused before any trial


def test_the_shipped_space_and_its_kinds(tmp_path: Path) -> None:
    space = load_space(ROOT / "configs" / "spaces" / "dropout-lr.yaml", Settings())
    kinds = {p.name: (p.choices, p.low, p.high, p.log, p.integer) for p in space}
    assert kinds == {
        "dropout": ((True, False), 0, 0, False, False),
        "dropout_conv": ((), 0.0, 0.5, False, False),
        "dropout_dense": ((), 0.0, 0.6, False, False),
        "lr": ((), 1e-4, 1e-2, True, False),
    }
    (batch,) = load_space(_written(tmp_path, "batch_size: {low: 32, high: 256}"), Settings())
    assert (batch.integer, batch.low, batch.high) == (True, 32, 256)


def test_a_plain_list_is_a_choice(tmp_path: Path) -> None:
    """`batch_size: [64, 128]` is `batch_size: {choices: [64, 128]}`, for numbers and booleans alike."""
    plain = load_space(_written(tmp_path, "batch_size: [64, 128]\ndropout: [true, false]"), Settings())
    spelled = "batch_size: {choices: [64, 128]}\ndropout: {choices: [true, false]}"
    assert plain == load_space(_written(tmp_path, spelled), Settings())
    assert plain == (Param("batch_size", choices=(64, 128)), Param("dropout", choices=(True, False)))


def test_a_space_that_is_no_mapping_shows_both_forms(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        load_space(_written(tmp_path, "- lr"), Settings())
    assert str(caught.value).endswith("e.g. 'lr: {low: 1e-4, high: 1e-2, log: true}' or 'batch_size: [64, 128]'")


def test_study_plots_log_and_warn_nothing_for_numeric_choices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`batch_size: [64, 128]` is drawn as numbers: matplotlib logs no "categorical units" line (as it
    did under Optuna's own slice plot, which hands it the choices as strings), and nothing warns."""
    need("optuna", "tune")
    import optuna

    from fmnist_lightning.tune import PLOTS, write_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(
        lambda trial: (
            0.8
            + trial.suggest_categorical("batch_size", [64, 128]) / 1000
            + trial.suggest_float("lr", 1e-4, 1e-2, log=True)
            + 0.01 * trial.suggest_categorical("dropout", [True, False])
        ),
        n_trials=6,
    )
    caplog.set_level(logging.INFO)  # the CLI's level
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_plots(study, tmp_path)
    assert [p.name for p in written] == list(PLOTS)
    assert all((tmp_path / name).stat().st_size > 1000 for name in PLOTS)
    matplotlib_lines = [r.getMessage() for r in caplog.records if r.name.startswith("matplotlib.category")]
    assert not matplotlib_lines and "categorical units" not in caplog.text, matplotlib_lines


def _written(folder: Path, text: str) -> Path:
    path = folder / "space.yaml"
    path.write_text(text + "\n")
    return path


def test_tune_without_the_extra_names_it(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_module(monkeypatch, "optuna")
    code, _, err = cli("tune", "--space", _written(tmp_path, SPACE), "--out", tmp_path / "s", *TINY_CPU)
    assert code == 2 and err.strip() == (
        "error: fmnist tune needs the 'tune' extra (optuna missing): pip install -e \".[tune]\""
    ), err


def test_failed_trials_are_recorded_and_the_study_goes_on(real_data: None, cli, tmp_path: Path) -> None:
    """A value the settings accept but this machine cannot run (fp16 on the CPU) fails its trial, not the study."""
    need("optuna", "tune")
    space = _written(tmp_path, "precision: {choices: [16-mixed]}")
    code, out, err = cli("tune", "--space", space, "--trials", "2", "--out", tmp_path / "s", *TINY_CPU)
    assert code == 0, err
    rows = _trials_csv(tmp_path / "s")
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"]
    assert all("precision 16-mixed needs a GPU" in r["error"] for r in rows)
    assert "no trial completed yet" in out and not (tmp_path / "s" / "best.yaml").exists()


def test_ddp_inside_a_trial_is_refused_in_one_line(cli, tmp_path: Path) -> None:
    need("optuna", "tune")
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    code, _, err = cli("tune", "--space", path, "--devices", "2", "--out", tmp_path / "s", *TINY_CPU)
    assert code == 2 and err.count("\n") == 1 and "DDP inside a trial is not supported" in err, err


def _trials_csv(study: Path) -> list[dict[str, str]]:
    with (study / "trials.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_study_on_real_data_writes_its_folder_and_best_yaml_reproduces(real_data: None, cli, tmp_path: Path) -> None:
    """Three deterministic trials of two short epochs, tracked in MLflow; best.yaml refits to the same val/acc."""
    need("optuna", "tune")
    need("mlflow", "tracking")
    space, study = tmp_path / "space.yaml", tmp_path / "study"
    space.write_text(SPACE)
    limits = ("--limit-train-batches", "8", "--limit-val-batches", "4", "--max-epochs", "2")
    args = ("tune", "--space", space, "--trials", "3", "--out", study, "--deterministic", "--offline", "--no-progress")
    code, out, err = cli(*args, *limits, "--logger", "csv,mlflow")
    assert code == 0, err
    rows = _trials_csv(study)
    assert [r["number"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"COMPLETE"}
    assert {"lr", "dropout_conv", "dropout", "best_val_acc", "epochs", "wall_time_s"} <= set(rows[0])
    for r in rows:  # each trial is an ordinary run folder
        trial = study / f"trial-{int(r['number']):03d}"
        assert (trial / "checkpoints" / "best.ckpt").is_file() and (trial / "config.yaml").is_file()
        assert r["epochs"] == "2"
    for plot in ("history.png", "importances.png", "slice.png"):
        assert (study / plot).stat().st_size > 1000, plot
    best = max(rows, key=lambda r: float(r["best_val_acc"]))
    assert f"best: trial {best['number']}" in out and "best.yaml" in out

    # best.yaml holds setting keys only, with the best trial's parameters.
    settings = resolve_settings(study / "best.yaml")
    assert settings.optimisation.lr == pytest.approx(float(best["lr"]), rel=1e-12)
    assert settings.model.dropout == (best["dropout"] == "True")
    assert (settings.run.max_epochs, settings.run.limit_train_batches, settings.run.deterministic) == (2, 8, True)

    # MLflow: one parent run for the study, each trial a child run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fmnist")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == ["trial-000", "trial-001", "trial-002"]

    # Refit from best.yaml alone: the same best val/acc, exactly (CPU, --deterministic, same seed).
    code, _, err = cli("fit", "--config", study / "best.yaml", "--logger", "csv", "--out", tmp_path / "refit")
    assert code == 0, err
    refit = [float(r["val/acc"]) for r in csv.DictReader((tmp_path / "refit" / "metrics.csv").open())]
    assert max(refit) == float(best["best_val_acc"])


def test_ctrl_c_ends_the_trial_as_pruned_and_a_rerun_continues_the_study(real_data: None, cli, tmp_path: Path) -> None:
    need("optuna", "tune")
    space, study = tmp_path / "space.yaml", tmp_path / "study"
    space.write_text(SPACE)
    args = ("--limit-train-batches", "300", "--max-epochs", "1", "--offline", "--no-progress", "--logger", "csv")
    command = [sys.executable, "-m", "fmnist_lightning", "tune", "--space", str(space), "--trials", "2"]
    command += ["--out", str(study), *args]
    pause = tmp_path / "pause"  # trial 0 pauses after its step 2: training, the clean stop's handler in place
    worker = subprocess.Popen(command, env=subprocess_env(**pause_env(pause, 2)), stderr=subprocess.PIPE, text=True)
    wait_for_pause(pause, 1, lambda: worker.poll() is None, lambda: ended_output(worker))
    worker.send_signal(signal.SIGINT)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 130 and "interrupted: stopped trial 0, recorded as pruned" in err, err[-3000:]
    code, _, err = cli(
        "tune", "--space", space, "--trials", "2", "--out", study, *args[2:], "--limit-train-batches", "5"
    )
    assert code == 0, err
    assert [(r["number"], r["state"]) for r in _trials_csv(study)] == [("0", "PRUNED"), ("1", "COMPLETE")]


def _worker(study: Path, space: Path, trials: int, pause: Path, *extra: str) -> subprocess.Popen[str]:
    """A tune worker whose first trial pauses after its first step (tests/pausing.py)."""
    args = [sys.executable, "-m", "fmnist_lightning", "tune", "--space", str(space), "--trials", str(trials)]
    args += ["--out", str(study), *TINY_CPU, "--logger", "csv", *extra]
    env = subprocess_env(**pause_env(pause, 1))
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_two_workers(tmp_path: Path, trials: int, outs: tuple[Path, Path], *extra: str) -> None:
    """Both workers take trials, by construction: the first one's first trial holds until the second
    worker has started a trial of its own; then both go on and share out the rest."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    pauses = (tmp_path / "pause-a", tmp_path / "pause-b")
    workers: list[subprocess.Popen[str]] = []
    try:
        for out, pause in zip(outs, pauses):
            workers.append(worker := _worker(out, space, trials, pause, *extra))
            wait_for_pause(pause, 1, lambda: worker.poll() is None, lambda: ended_output(worker))
        for pause in pauses:
            (pause / "go").touch()
        for worker in workers:
            output, _ = worker.communicate(timeout=300)
            assert worker.returncode == 0, output[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=60)


def _check_shared(rows: list[dict[str, str]], trials: int, outs: tuple[Path, ...]) -> None:
    """All trials finished, each number once, each trial's run folder in exactly one worker's folder."""
    assert sorted(int(r["number"]) for r in rows) == list(range(trials))
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in rows), rows
    folders = [p.name for out in outs for p in out.glob("trial-*")]
    assert sorted(folders) == [f"trial-{n:03d}" for n in range(trials)]
    for out in outs:
        for folder in out.glob("trial-*"):
            assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
def test_two_workers_share_the_default_sqlite_study(real_data: None, tmp_path: Path) -> None:
    need("optuna", "tune")
    study = tmp_path / "study"
    _run_two_workers(tmp_path, 6, (study, study))
    rows = _trials_csv(study)
    _check_shared(rows, 6, (study,))
    per_worker = Counter(r["worker"] for r in rows)
    assert len(per_worker) == 2, per_worker  # both took trials


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for this test: initdb in a temporary folder, on a free port of 127.0.0.1."""
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if found is None:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql")
    bin_dir = Path(found).resolve().parent  # initdb may be a link; createdb lies beside the real one
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    db = data / "db"

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(db), "-A", "trust", "-U", "fmnist", "--no-sync")
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(str(bin_dir / "pg_ctl"), "-D", str(db), "-o", options, "-l", str(data / "log"), "-w", "start")
        pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "fmnist", "study")
        yield f"postgresql+psycopg://fmnist@127.0.0.1:{port}/study"
    finally:
        stop = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(db), "-m", "immediate", "stop"]
        subprocess.run(stop, capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgres_study(real_data: None, postgres_url: str, tmp_path: Path) -> None:
    """Two workers with their own study folders (as on two machines) and one study in PostgreSQL."""
    need("optuna", "tune")
    need("psycopg", "tune")
    outs = (tmp_path / "machine-a", tmp_path / "machine-b")
    _run_two_workers(tmp_path, 6, outs, "--storage", postgres_url, "--study-name", "shared")
    import optuna

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    rows = [{"number": str(t.number), "state": t.state.name} for t in study.get_trials()]
    _check_shared(rows, 6, outs)
    assert all(any(out.glob("trial-*")) for out in outs)  # both took trials
    assert all(len(_trials_csv(out)) == 6 for out in outs)  # each worker's summary covers the whole study
    assert all(yaml.safe_load((out / "best.yaml").read_text())["lr"] > 0 for out in outs)
