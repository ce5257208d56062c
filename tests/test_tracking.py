"""Experiment tracking: --logger mlflow records a run's settings, per-epoch metrics and files, on a
real `mlflow server` and in the embedded default store."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmnist_lightning.errors import FmnistError
from fmnist_lightning.settings import resolve_settings
from tests.helpers import TINY_CPU, free_port, need, subprocess_env, wait_until, without_module

TWO_EPOCHS = [*TINY_CPU, "--max-epochs", "2"]
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "images_per_s")


def _check_run(client, run_id: str, run_dir: Path, artifacts: set[str]) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    settings = resolve_settings(run_dir / "config.yaml")
    for name, value in settings.flat().items():  # the resolved settings, as params
        assert run.data.params[name] == str(value), name
    for name in EPOCH_METRICS:  # one value per epoch
        history = client.get_metric_history(run_id, name)
        assert len(history) == 2 and len({m.step for m in history}) == 2, (name, history)
    assert {a.path for a in client.list_artifacts(run_id)} == artifacts


def test_fit_logs_to_the_embedded_store_by_default(real_data: None, cli, tmp_path: Path) -> None:
    need("mlflow", "tracking")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "001"
    code, _, err = cli("fit", *TWO_EPOCHS, "--logger", "mlflow", "--out", run_dir)
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
    args = ("fit", *TWO_EPOCHS, "--logger", "mlflow,csv", "--tracking-uri", mlflow_server, "--experiment", "served")
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
    without_module(monkeypatch, "mlflow")
    code, _, err = cli("fit", *TINY_CPU, "--logger", "mlflow", "--out", tmp_path / "run")
    assert code == 2 and err.strip() == (
        "error: --logger mlflow needs the 'tracking' extra (mlflow missing): pip install -e \".[tracking]\""
    ), err


def test_an_unreachable_tracking_server_is_one_line_before_training(real_data: None, tmp_path: Path) -> None:
    """Nothing listens on the port: one line naming the URI and what to do, within seconds (MLflow's
    client alone retries for about 4 minutes, then prints a traceback), and nothing trained or kept."""
    need("mlflow", "tracking")
    uri = f"http://127.0.0.1:{free_port()}"  # bound, then closed: nothing listens there
    run_dir = tmp_path / "runs" / "001"
    args = [sys.executable, "-m", "fmnist_lightning", "fit", "--logger", "mlflow", "--tracking-uri", uri]
    args += ["--max-epochs", "1", "--limit-train-batches", "2", "--limit-val-batches", "1", "--offline"]
    start = time.monotonic()
    result = subprocess.run(
        [*args, "--no-progress", "--out", str(run_dir)],
        env=subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot reach the MLflow tracking server {uri} (Connection refused)")
    assert "mlflow server --host 127.0.0.1" in lines[0] and "drop --tracking-uri" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    # The bound is the behaviour: no retries. Most of the time is importing torch and Lightning (about
    # 10 s on a busy 2-core machine); MLflow's client alone would retry for about 4 minutes.
    assert elapsed < 90, f"{elapsed:.0f} s"
    assert not run_dir.exists() and not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("mlflow.db"))


class _Answers(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(401, "login first")  # an HTTP answer, if not a welcome one

    def log_message(self, *args: object) -> None:
        pass


def test_any_http_answer_counts_as_reachable_and_silence_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that answers with an error status (a login wall, a proxy) is there: MLflow gets to
    say what it thinks of it. One that accepts the connection and never answers is refused."""
    from fmnist_lightning import tracking

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracking.check_server(f"http://127.0.0.1:{server.server_port}", tmp_path)
    finally:
        server.shutdown()
        server.server_close()

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts connections; nobody reads or answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        monkeypatch.setattr(tracking, "SERVER_TIMEOUT_S", 0.5)
        with pytest.raises(FmnistError, match=r"^cannot reach the MLflow tracking server .* \(no answer within 0.5 s"):
            tracking.check_server(uri, tmp_path)
    tracking.check_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)  # a local store: nothing to reach
