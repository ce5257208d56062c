"""Experiment tracking: --logger mlflow records a run's settings, per-epoch metrics and files, on a
real `mlflow server` and in the embedded default store."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmnist_lightning.settings import resolve_settings
from tests.helpers import free_port, need, subprocess_env, wait_until

TINY = ("--offline", "--no-progress", "--limit-train-batches", "5", "--limit-val-batches", "2", "--max-epochs", "2")
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "images_per_s")


def _check_run(client, run_id: str, run_dir: Path, artifacts: set[str]) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    settings = resolve_settings(run_dir / "config.yaml")
    for name, value in settings.model_dump().items():  # the resolved settings, as params
        assert run.data.params[name] == str(value), name
    for name in EPOCH_METRICS:  # one value per epoch
        history = client.get_metric_history(run_id, name)
        assert len(history) == 2 and len({m.step for m in history}) == 2, (name, history)
    assert {a.path for a in client.list_artifacts(run_id)} == artifacts


def test_fit_logs_to_the_embedded_store_by_default(real_data: None, cli, tmp_path: Path) -> None:
    need("mlflow", "tracking")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "001"
    code, _, err = cli("fit", *TINY, "--logger", "mlflow", "--out", run_dir)
    assert code == 0, err
    assert not (run_dir / "tensorboard").exists()  # --logger replaces the default
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = (run_dir / "mlflow-run.json").read_text().split('"run_id": "')[1].split('"')[0]
    _check_run(client, run_id, run_dir, {"config.yaml", "curves.png"})
    assert list((tmp_path / "runs" / "mlartifacts").iterdir())  # the artifacts beside the database


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real tracking server on a free port of 127.0.0.1: SQLite backend, local artifact root."""
    need("mlflow", "tracking")
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    args = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    args += ["--artifacts-destination", str(tmp_path / "server-artifacts")]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 120, "mlflow server")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_fit_and_test_log_to_a_real_mlflow_server(real_data: None, mlflow_server: str, cli, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "001"
    args = ("fit", *TINY, "--logger", "mlflow,csv", "--tracking-uri", mlflow_server, "--experiment", "served")
    code, _, err = cli(*args, "--out", run_dir, "--test")
    assert code == 0, err
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing local with a server
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert run.info.run_name == "001"
    artifacts = {"config.yaml", "curves.png", "report.json", "confusion_matrix.png"}
    _check_run(client, run.info.run_id, run_dir, artifacts)
    assert list((tmp_path / "server-artifacts").rglob("report.json"))  # stored by the server


def test_mlflow_without_the_extra_names_it(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    code, _, err = cli("fit", *TINY, "--logger", "mlflow", "--out", tmp_path / "run")
    assert code == 2 and err.strip() == (
        "error: --logger mlflow needs the 'tracking' extra (mlflow missing): pip install -e \".[tracking]\""
    ), err
