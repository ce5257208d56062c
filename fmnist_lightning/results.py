"""`fmnist results`: time-to-accuracy rows from finished run folders, without retraining.

A run folder holds what it needs: config.yaml (the settings, versions, commit, CPU and the
precision chosen), metrics.csv (each epoch's validation accuracy and training seconds) and, once
`fmnist test` ran, report.json. Runs whose settings differ only in the seed (and in what does not
change training: where the data and logs live, the progress bar) form one recipe; its row gives
the test accuracy as mean +- std over them, as docs/RESULTS.md does, and for each target the
training minutes until validation accuracy first reached it. Like the HTML report, this imports
neither torch nor Lightning.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist_lightning.errors import UsageError
from fmnist_lightning.runs import CONFIG, METRICS, TEST_REPORT, read_metrics, time_to_val_acc
from fmnist_lightning.settings import read_config

DEFAULT_TARGETS = (0.91, 0.93, 0.94, 0.95)
# Settings that do not change what a run trains: runs differing only in these (and the seed) are
# seeds of one recipe.
NOT_RECIPE = (
    "seed",
    "data_dir",
    "offline",
    "progress",
    "logger",
    "tracking_uri",
    "experiment",
    "profiler",
    "checkpoint_every_n_steps",
)


@dataclass
class RunRow:
    """One run folder's figures."""

    run_dir: Path
    seed: int
    epochs: int
    train_minutes: float  # the sum of train_time_s: validation excluded
    best_val_acc: float
    test_acc: float | None  # report.json's, None before `fmnist test`
    tta: bool | None
    to_target: dict[float, float | None]  # training minutes until val/acc first reached the target
    precision: str
    commit: str | None
    cpu: str | None
    recipe: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class RecipeRow:
    """Runs of one recipe (its seeds)."""

    name: str
    runs: list[RunRow]

    @property
    def tested(self) -> list[float]:
        return [r.test_acc for r in self.runs if r.test_acc is not None]

    def test_mean_std(self) -> tuple[float, float] | None:
        tested = self.tested
        if not tested:
            return None
        return statistics.mean(tested), statistics.stdev(tested) if len(tested) > 1 else 0.0

    def minutes_to(self, target: float) -> float | None:
        """Mean training minutes to the target over the runs, None unless every run reached it."""
        minutes = [r.to_target[target] for r in self.runs]
        return statistics.mean(m for m in minutes if m is not None) if None not in minutes else None

    def mean(self, name: str) -> float:
        return statistics.mean(getattr(r, name) for r in self.runs)

    def distinct(self, name: str) -> str:
        values = sorted({str(getattr(r, name)) for r in self.runs if getattr(r, name) is not None})
        return ", ".join(values) or "unknown"

    def to_json(self) -> dict[str, Any]:
        stats = self.test_mean_std()
        return {
            "recipe": self.name,
            "runs": [str(r.run_dir) for r in self.runs],
            "seeds": [r.seed for r in self.runs],
            "test_acc": [r.test_acc for r in self.runs],
            "test_acc_mean": stats[0] if stats else None,
            "test_acc_std": stats[1] if stats else None,
            "tta": [r.tta for r in self.runs],
            "best_val_acc": [r.best_val_acc for r in self.runs],
            "epochs": [r.epochs for r in self.runs],
            "train_minutes": [r.train_minutes for r in self.runs],
            "minutes_to_val_acc": {str(t): [r.to_target[t] for r in self.runs] for t in self.runs[0].to_target},
            "precision": self.distinct("precision"),
            "commit": self.distinct("commit"),
            "cpu": self.distinct("cpu"),
        }


def read_run(run_dir: Path, targets: tuple[float, ...] = DEFAULT_TARGETS) -> RunRow:
    """The figures of one run folder (UsageError if it has no config.yaml and metrics.csv)."""
    missing = [name for name in (CONFIG, METRICS) if not (run_dir / name).is_file()]
    if missing:
        raise UsageError(f"{run_dir} is not a trained run folder: it has no {' or '.join(missing)}")
    settings, provenance = read_config(run_dir / CONFIG)
    rows = read_metrics(run_dir / METRICS)
    to_target = {}
    for target in targets:
        reached = time_to_val_acc(rows, target)
        to_target[target] = reached[1] / 60 if reached else None
    report = _read_json(run_dir / TEST_REPORT)
    return RunRow(
        run_dir=run_dir,
        seed=int(settings.get("seed", 0)),
        epochs=len(rows),
        train_minutes=sum(row.get("train_time_s", 0.0) for row in rows) / 60,
        best_val_acc=max((row.get("val/acc", float("nan")) for row in rows), default=float("nan")),
        test_acc=report.get("accuracy"),
        tta=report.get("tta"),
        to_target=to_target,
        precision=str(provenance.get("precision", settings.get("precision", "unknown"))),
        commit=(provenance.get("git_commit") or None) and str(provenance["git_commit"])[:7],
        cpu=provenance.get("cpu"),
        recipe={k: v for k, v in settings.items() if k not in NOT_RECIPE},
    )


def group_recipes(runs: list[RunRow]) -> list[RecipeRow]:
    """Runs grouped by recipe, in the order of each recipe's first run."""
    groups: list[RecipeRow] = []
    for run in runs:
        same = next((g for g in groups if g.runs[0].recipe == run.recipe), None)
        if same is None:
            groups.append(RecipeRow(_recipe_name(run.run_dir), [run]))
        else:
            same.runs.append(run)
    return groups


def results(run_dirs: list[Path], targets: tuple[float, ...] = DEFAULT_TARGETS) -> list[RecipeRow]:
    return group_recipes([read_run(d, targets) for d in run_dirs])


def _recipe_name(run_dir: Path) -> str:
    """The run folder's name without a trailing seed (`improved-seed1` -> `improved`)."""
    return re.sub(r"[-_]?seed\d+$", "", run_dir.name) or run_dir.name


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}
