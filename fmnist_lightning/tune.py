"""`fmnist tune`: an Optuna study over a search space, each trial an ordinary run folder.

Read `run_tune` top to bottom: check the extra and the hardware, open (or continue) the study,
run trials until the study holds `trials` of them, then write the study folder's summary:

    STUDY/trial-000/ ...   one run folder per trial (`fmnist report STUDY/trial-000` works)
    STUDY/study.db         the Optuna storage (SQLite) unless --storage is given
    STUDY/trials.csv       number, state, parameters, best val/acc, epochs run, wall time
    STUDY/best.yaml        the best trial's settings: `fmnist fit --config STUDY/best.yaml`
    STUDY/history.png, importances.png, slice.png   Optuna's matplotlib plots

Sampling is TPE seeded from --seed and the trial number, pruning a median pruner on each epoch's
val/acc. Several processes (or machines) can work on one study: give them the same --storage (an RDB
URL such as postgresql+psycopg://...) and --study-name. `--trials N` is the size of the study, not of
one process: every worker stops once N trials are finished or running, so a rerun continues it up to N.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from fmnist_lightning.errors import FmnistError, TrainingInterrupted, UsageError, extra_hint, require_extra
from fmnist_lightning.hardware import resolve_hardware
from fmnist_lightning.settings import Settings
from fmnist_lightning.space import Param, load_space, with_value
from fmnist_lightning.tracking import log_parent_results, parent_run
from fmnist_lightning.training import FitResult, run_fit

TUNE_EXTRA_HINT = extra_hint("tune")
STUDY_DB = "study.db"
TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"
PLOTS = ("history.png", "importances.png", "slice.png")
MONITOR = "val/acc"
# Pruning: the median of earlier trials at the same epoch, once 4 trials have finished; from epoch 1.
PRUNER_STARTUP_TRIALS = 4
PRUNER_WARMUP_EPOCHS = 0
# A worker that dies (kill -9, power loss) leaves its trial RUNNING; with a heartbeat every 30 s,
# a trial silent for 2 minutes is marked failed by the next worker that starts a trial.
HEARTBEAT_S, GRACE_S = 30, 120


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / f"trial-{number:03d}"


@dataclass
class TrialRow:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL or RUNNING
    params: dict[str, Any]
    val_acc: float | None  # the trial's best val/acc
    epochs: int | None
    wall_time_s: float | None
    error: str
    worker: str  # host:pid of the process that ran it


@dataclass
class TuneResult:
    study_dir: Path
    study_name: str
    rows: list[TrialRow]  # every trial of the study, by number
    best: TrialRow | None
    best_yaml: Path | None
    plots: list[Path]


class PruneOnValAcc(Callback):
    """Reports each epoch's val/acc to the trial and stops training when the pruner says so.

    Not optuna_integration's PyTorchLightningPruningCallback, although it works with the
    `lightning` package (it imports `lightning.pytorch`): it raises TrialPruned in
    `on_validation_end`, before ModelCheckpoint and metrics.csv see the epoch, so a trial pruned
    after its first epoch would leave a run folder without checkpoint or metrics. This reports at
    the epoch's end, after both have their epoch, and asks the Trainer to stop; the objective then
    records the trial as pruned.
    """

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_after: int | None = None  # epochs run when pruned

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        value = trainer.callback_metrics.get(MONITOR)
        if value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_after = trainer.current_epoch + 1
            trainer.should_stop = True


def check_single_process(base: Settings) -> None:
    """A trial runs in this process: DDP inside a trial is refused (run several workers instead)."""
    hw = resolve_hardware(base.hardware)
    n = len(hw.devices) if isinstance(hw.devices, list) else hw.devices
    if n * hw.num_nodes > 1:
        raise UsageError(
            f"fmnist tune runs each trial in one process, not {n * hw.num_nodes} (DDP inside a trial is not "
            "supported): give --devices 1, and start one tune worker per device on a shared --storage"
        )


def open_study(study_dir: Path, storage: str | None, study_name: str | None, seed: int) -> Any:
    """The study in `storage` (default: STUDY/study.db), created on first use, loaded after."""
    import optuna
    import sqlalchemy.exc

    url = storage or f"sqlite:///{(study_dir / STUDY_DB).resolve()}"
    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)  # for messages
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(f"--storage {url!r} is not a database URL, e.g. postgresql+psycopg://user@host/db") from None
    # SQLite serialises writers; wait for a busy database instead of failing (workers on one machine).
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    # Optuna marks the heartbeat "experimental" (since 2.9); it is what keeps a dead worker's trial
    # from holding the study's budget forever.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    attempt = 0
    while True:  # workers starting together on a new database race to create its tables: retry
        try:
            rdb = optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
            return optuna.create_study(
                storage=rdb,
                study_name=study_name or study_dir.name,
                direction="maximize",
                sampler=optuna.samplers.TPESampler(seed=seed),
                pruner=optuna.pruners.MedianPruner(
                    n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
                ),
                load_if_exists=True,
            )
        except ImportError as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise UsageError(
                f"no database driver for --storage {shown}{cause}; postgresql+psycopg:// comes with the 'tune' extra: "
                f"{TUNE_EXTRA_HINT}"
            ) from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.DuplicatedStudyError) as exc:
            attempt += 1
            if attempt == 3:
                raise FmnistError(f"cannot open the study in {shown}: {str(exc).splitlines()[0]}") from None
            time.sleep(attempt)


OVER_BUDGET = "over_budget"  # user attr of a trial created after the study was full (never run)


def in_study(study: Any) -> list[Any]:
    """The study's trials, finished or running in any worker, without those created past its size."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(OVER_BUDGET)]


def taken(study: Any) -> int:
    return len(in_study(study))


class Objective:
    """One trial: the base settings with the sampled parameters, trained into STUDY/trial-NNN."""

    def __init__(self, base: Settings, space: tuple[Param, ...], study_dir: Path, seed: int, size: int) -> None:
        self.base, self.space, self.study_dir, self.seed, self.size = base, space, study_dir, seed, size
        self.interrupted: int | None = None  # the number of the trial Ctrl-C (or SIGTERM) stopped

    def __call__(self, trial: Any) -> float:
        import optuna

        # Workers check the study's size before asking for a trial, so two of them can both ask for
        # the last place. Trial numbers are handed out by the storage, one each: the one numbered
        # past the size does not run, is left out of the study's results, and ends its worker.
        if trial.number >= self.size:
            trial.set_user_attr(OVER_BUDGET, True)
            trial.study.stop()
            raise optuna.TrialPruned("the study already holds its trials")

        # Each trial draws from its own seed: workers sharing a study would otherwise draw the same
        # values from equally seeded samplers, and one worker's draws stay reproducible.
        trial.study.sampler = optuna.samplers.TPESampler(seed=self.seed + trial.number)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it, in a shared study
        s = with_value(self.base, {p.name: p.suggest(trial) for p in self.space})
        pruning = PruneOnValAcc(trial)
        try:
            result = run_fit(s, out=trial_dir(self.study_dir, trial.number), extra_callbacks=[pruning])
        except TrainingInterrupted as exc:  # Ctrl-C: last.ckpt saved; the trial ends as pruned
            self.interrupted = trial.number
            trial.set_user_attr("error", f"interrupted: {exc}")
            raise optuna.TrialPruned("interrupted") from None
        except SystemExit as exc:
            # Lightning turns Ctrl-C before training starts into exit(1); it is still Ctrl-C.
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        _record(trial, result)
        if pruning.pruned_after is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_after}")
        return result.best_val_acc


def _record(trial: Any, result: FitResult) -> None:
    # Kept in the study, not only in the run folder: workers on other machines read them too.
    trial.set_user_attr("best_val_acc", result.best_val_acc)
    trial.set_user_attr("epochs", result.epochs)
    trial.set_user_attr("wall_time_s", round(result.wall_time_s, 1))
    trial.set_user_attr("run_dir", str(result.run_dir))


def run_tune(
    base: Settings,
    space_file: Path,
    trials: int,
    study_dir: Path | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> TuneResult:
    """Read the search space (checked against `base`), run trials until the study holds `trials` (or
    `timeout` seconds pass) in `study_dir` (default runs/tune-SPACE), then summarise it. Raises
    TrainingInterrupted after the summary when Ctrl-C stopped a trial (recorded as pruned)."""
    space = load_space(space_file, base)
    require_extra("tune", ("optuna",), "fmnist tune")
    check_single_process(base)
    study_dir = study_dir or Path("runs") / f"tune-{space_file.stem}"
    import optuna

    study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.get_logger("optuna").setLevel(logging.INFO)
    study = open_study(study_dir, storage, study_name, base.run.seed)
    objective = Objective(base, space, study_dir, base.run.seed, trials)

    def stop_when_full(study: Any, trial: Any) -> None:
        if objective.interrupted is not None or taken(study) >= trials:
            study.stop()

    with parent_run(base.tracking, study_dir, study.study_name, study.user_attrs.get("mlflow_parent_run")) as parent:
        if parent is not None and "mlflow_parent_run" not in study.user_attrs:
            study.set_user_attr("mlflow_parent_run", parent)  # for the workers that join (same store)
        if (todo := trials - taken(study)) > 0:
            study.optimize(objective, n_trials=todo, timeout=timeout, catch=(Exception,), callbacks=[stop_when_full])
        result = summarise(study, base, study_dir)
        if parent is not None and result.best is not None:
            files = [study_dir / TRIALS_CSV, *result.plots, *([result.best_yaml] if result.best_yaml else [])]
            log_parent_results(base.tracking, study_dir, parent, {f"best_{MONITOR}": result.best.val_acc or 0.0}, files)
    if objective.interrupted is not None:
        raise TrainingInterrupted(
            f"stopped trial {objective.interrupted}, recorded as pruned; run the same command again to continue "
            f"the study (summary so far in {study_dir / TRIALS_CSV})"
        )
    return result


def trial_rows(study: Any) -> list[TrialRow]:
    rows = []
    for t in sorted(in_study(study), key=lambda t: t.number):
        attrs = t.user_attrs
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                params=dict(t.params),
                val_acc=attrs.get("best_val_acc"),
                epochs=attrs.get("epochs"),
                wall_time_s=attrs.get("wall_time_s"),
                error=attrs.get("error", ""),
                worker=attrs.get("worker", ""),
            )
        )
    return rows


def summarise(study: Any, base: Settings, study_dir: Path) -> TuneResult:
    """trials.csv, best.yaml and the plots, from every trial in the study (all workers')."""
    rows = trial_rows(study)
    write_trials_csv(rows, study_dir / TRIALS_CSV)
    complete = [r for r in rows if r.state == "COMPLETE" and r.val_acc is not None]
    best = max(complete, key=lambda r: r.val_acc or 0.0, default=None)
    best_yaml = None
    if best is not None:
        best_yaml = study_dir / BEST_YAML
        write_best_yaml(with_value(base, best.params), best, best_yaml)
    plots = write_plots(study, study_dir)
    return TuneResult(study_dir, study.study_name, rows, best, best_yaml, plots)


def write_trials_csv(rows: list[TrialRow], path: Path) -> None:
    names = sorted({name for r in rows for name in r.params})
    columns = ["number", "state", *names, "best_val_acc", "epochs", "wall_time_s", "worker", "error"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            values = [r.params.get(n, "") for n in names]
            measured = [_blank(r.val_acc), _blank(r.epochs), _blank(r.wall_time_s)]
            writer.writerow([r.number, r.state, *values, *measured, r.worker, r.error])


def _blank(value: Any) -> Any:
    return "" if value is None else value


def write_best_yaml(s: Settings, best: TrialRow, path: Path) -> None:
    """The best trial's settings, as `fmnist fit --config` takes them (comments say where they came from)."""
    import yaml

    tuned = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    header = (
        f"# Best trial of the study: trial {best.number} (best {MONITOR} {best.val_acc:.4f}), tuned: {tuned}.\n"
        f"# Reproduce it: fmnist fit --config {path}; train longer with --max-epochs, --limit-train-batches 1.0.\n"
    )
    path.write_text(header + yaml.safe_dump(s.flat(json=True), sort_keys=False), encoding="utf-8")


def write_plots(study: Any, study_dir: Path) -> list[Path]:
    """Optimisation history, parameter importances (needs 2 completed trials) and val/acc against
    each parameter. A plot Optuna cannot draw yet is left out, with a line in the log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    def optuna_plot(make: Callable[[Any], Any]) -> Callable[[Path], None]:
        def draw(path: Path) -> None:
            with warnings.catch_warnings():
                # Optuna marks its matplotlib backend experimental, and says so on every plot.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = make(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)

        return draw

    makers: list[tuple[str, Callable[[Path], None], int]] = [
        (PLOTS[0], optuna_plot(vis.plot_optimization_history), 1),
        (PLOTS[1], optuna_plot(vis.plot_param_importances), 2),
        (PLOTS[2], lambda path: _plot_slices(complete, path), 1),  # not Optuna's: see plots.plot_slices
    ]
    written = []
    for name, draw, needed in makers:
        path = study_dir / name
        if len(complete) < needed:
            logging.getLogger(__name__).info(
                "%s: needs %d completed trials, the study has %d", name, needed, len(complete)
            )
            continue
        try:
            draw(path)
        except (ValueError, RuntimeError, ImportError) as exc:
            logging.getLogger(__name__).info("%s not drawn: %s", name, exc)
            continue
        written.append(path)
    return written


def _plot_slices(complete: list[Any], path: Path) -> None:
    """Each completed trial's val/acc against each parameter it drew (numbers as numbers)."""
    import optuna

    from fmnist_lightning.plots import SliceParam, plot_slices

    distributions: dict[str, Any] = {}
    for t in complete:
        for name, distribution in t.distributions.items():
            distributions.setdefault(name, distribution)
    params = []
    for name in sorted(distributions):
        distribution = distributions[name]
        points = [(t.params[name], t.value, t.number) for t in complete if name in t.params and _finite(t.value)]
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            params.append(SliceParam(name, points, choices=tuple(distribution.choices)))
        else:
            params.append(SliceParam(name, points, log=bool(getattr(distribution, "log", False))))
    if not params:
        raise ValueError("the study's trials drew no parameters")
    plot_slices(params, f"best {MONITOR}", path)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
