"""Experiment tracking: the loggers a run's `--logger` asks for, and what MLflow records of a run.

metrics.csv is always written (callbacks.EpochMetricsCSV); `--logger` adds TensorBoard (when
installed) and MLflow (the 'tracking' extra) through Lightning's loggers. MLflow records the
resolved settings as params, the per-epoch metrics, and the run folder's config.yaml, curves.png
and, after a test, report.json and confusion_matrix.png as artifacts.

Without `--tracking-uri` the MLflow store is embedded: a SQLite file in the run folder's parent
(runs/mlflow.db for runs/001, STUDY/mlflow.db for a study's trials), artifacts in mlartifacts/
beside it: no server, and every run of that folder lands in one store. The run's MLflow id is kept
in the run folder (mlflow-run.json), so a resumed fit continues the same MLflow run and a later
`fmnist test` attaches its report to it. A server given by an http(s) `--tracking-uri` must answer
within a few seconds, before anything trains (`check_server`).

mlflow and lightning are imported inside the functions: reading this module costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from fmnist_lightning.errors import FmnistError, UsageError, extra_hint, require_extra
from fmnist_lightning.hardware import is_global_zero
from fmnist_lightning.runs import MLFLOW_RUN, TENSORBOARD_DIR
from fmnist_lightning.settings import TrackingSettings

TRACKING_EXTRA_HINT = extra_hint("tracking")
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
SERVER_TIMEOUT_S = 5  # for a tracking server's first answer (see check_server)
PARENT_RUN_TAG = "mlflow.parentRunId"  # how MLflow nests a run under another (its UI shows the tree)

# The MLflow run new runs are nested under (a study's run while `tune` runs its trials). A context
# rather than a parameter: the trial's Trainer is built deep inside `run_fit`.
_parent_run: ContextVar[str | None] = ContextVar("parent_run", default=None)


def require_mlflow() -> None:
    require_extra("tracking", ("mlflow",), "--logger mlflow")


def tracking_uri(t: TrackingSettings, store_dir: Path) -> str:
    """--tracking-uri, or the embedded SQLite store in `store_dir`."""
    return t.tracking_uri or f"sqlite:///{(store_dir / MLFLOW_DB).resolve()}"


def _artifact_location(t: TrackingSettings, store_dir: Path) -> str | None:
    # A server decides where artifacts go; the embedded store keeps them beside its database.
    return None if t.tracking_uri else (store_dir / MLFLOW_ARTIFACTS).resolve().as_uri()


def check_server(uri: str, store_dir: Path) -> None:
    """An http(s) tracking URI must answer within SERVER_TIMEOUT_S, else one line says what to do.

    MLflow's client retries a refused connection with growing pauses for minutes (about 4 with its
    defaults) and then fails with a traceback. Any HTTP answer counts, even an error status (a
    server that wants a login, a proxy with another path): only no answer at all is refused. So do
    TLS errors (MLflow checks certificates with its own settings); urllib and MLflow both take a
    proxy from HTTP(S)_PROXY.
    """
    import http.client
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # not a port number: MLflow reports it in its own words
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S).close()
        return
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            return
        problem: object = exc.reason
    except ValueError:  # a URL urllib cannot take apart: MLflow reports it in its own words
        return
    except (OSError, http.client.HTTPException) as exc:  # accepted, then no (HTTP) answer
        problem = exc
    if isinstance(problem, TimeoutError):
        why = f"no answer within {SERVER_TIMEOUT_S} s"
    elif isinstance(problem, OSError) and problem.strerror:
        why = problem.strerror
    else:
        why = str(problem) or type(problem).__name__
    if parts.hostname in ("127.0.0.1", "localhost", "::1"):
        todo = f"start it (mlflow server --host {parts.hostname} --port {port}) or correct --tracking-uri"
    else:
        todo = "check that the server runs and that --tracking-uri is right"
    raise FmnistError(
        f"cannot reach the MLflow tracking server {uri} ({why}): {todo}, "
        f"or drop --tracking-uri to record runs in {store_dir / MLFLOW_DB}"
    )


def _client(t: TrackingSettings, store_dir: Path) -> Any:
    """An MlflowClient of the store, its server checked first (see `check_server`)."""
    require_mlflow()
    check_server(tracking_uri(t, store_dir), store_dir)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(t, store_dir))


def experiment_id(t: TrackingSettings, store_dir: Path) -> str:
    """The id of `t.experiment` in the store, created if needed (tolerating a worker that creates
    it at the same moment)."""
    client = _client(t, store_dir)
    from mlflow.exceptions import MlflowException

    for _ in range(2):
        found = client.get_experiment_by_name(t.experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(client.create_experiment(t.experiment, artifact_location=_artifact_location(t, store_dir)))
        except MlflowException:
            continue  # created by another process in between: read it back
    raise UsageError(f"cannot create MLflow experiment {t.experiment!r} at {tracking_uri(t, store_dir)}")


def build_loggers(t: TrackingSettings, run_dir: Path, params: dict[str, Any]) -> list[Any]:
    """Lightning loggers for `t.logger` (an empty list: metrics.csv only); MLflow records `params`
    (the run's settings)."""
    loggers: list[Any] = []
    if "tensorboard" in t.logger:
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name=TENSORBOARD_DIR, version=""))
        except ModuleNotFoundError:
            pass  # tensorboard is optional: without it, the default logs metrics.csv only (as always)
    if "mlflow" in t.logger:
        loggers.append(_mlflow_logger(t, run_dir, params))
    return loggers


def _mlflow_logger(t: TrackingSettings, run_dir: Path, params: dict[str, Any]) -> Any:
    from lightning.pytorch.loggers import MLFlowLogger

    store = run_dir.parent
    uri = tracking_uri(t, store)
    tags = {"fmnist.run_dir": str(run_dir)}
    if parent := _parent_run.get():
        tags[PARENT_RUN_TAG] = parent
    if not is_global_zero():  # Lightning's loggers write from rank 0 only
        return MLFlowLogger(experiment_name=t.experiment, tracking_uri=uri)
    experiment_id(t, store)
    saved = _saved_run(run_dir)
    resumed = saved["run_id"] if saved and saved["tracking_uri"] == uri else None
    logger = MLFlowLogger(
        experiment_name=t.experiment, run_name=run_dir.name, tracking_uri=uri, tags=tags, run_id=resumed
    )
    if resumed is None:  # MLflow refuses to change a param: a resumed run keeps the settings it started with
        logger.log_hyperparams(params)
    (run_dir / MLFLOW_RUN).write_text(json.dumps({"tracking_uri": uri, "run_id": logger.run_id}) + "\n")
    return logger


def _saved_run(run_dir: Path) -> dict[str, str] | None:
    path = run_dir / MLFLOW_RUN
    return json.loads(path.read_text()) if path.is_file() else None


def log_run_files(run_dir: Path, files: Iterable[Path]) -> None:
    """Attach these files to the run folder's MLflow run as artifacts (nothing without one)."""
    saved = _saved_run(run_dir)
    if saved is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(saved["tracking_uri"])
    for path in files:
        if path.is_file():
            client.log_artifact(saved["run_id"], str(path))


@contextmanager
def parent_run(t: TrackingSettings, store_dir: Path, name: str, run_id: str | None = None) -> Iterator[str | None]:
    """While inside, new MLflow runs are children of the run `name` (`run_id` if it exists, else a
    new one); yields its id, or None when `t.logger` has no mlflow."""
    if "mlflow" not in t.logger:
        yield None
        return
    client = _client(t, store_dir)
    from mlflow.exceptions import MlflowException

    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException:  # a run in another worker's embedded store: this store gets its own
            run_id = None
    if run_id is None:
        run_id = client.create_run(experiment_id(t, store_dir), run_name=name).info.run_id
    token = _parent_run.set(run_id)
    status = "KILLED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        _parent_run.reset(token)
        client.set_terminated(run_id, status)


def log_parent_results(
    t: TrackingSettings, store_dir: Path, run_id: str, metrics: dict[str, float], files: Iterable[Path]
) -> None:
    """The study's summary on its parent run: the best value, and its table and plots as artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(t, store_dir))
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))
