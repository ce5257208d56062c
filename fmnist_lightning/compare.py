"""The tutorial's central experiment: the same configuration trained with and without dropout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmnist_lightning.evaluation import run_test
from fmnist_lightning.plots import plot_compare
from fmnist_lightning.runs import claimed_run_dir
from fmnist_lightning.settings import Settings
from fmnist_lightning.training import run_fit

VARIANTS = (("dropout", True), ("no-dropout", False))
COMPARE_PLOT, COMPARE_JSON = "compare.png", "compare.json"


def run_compare(s: Settings, out: Path | None = None) -> list[dict[str, Any]] | None:
    """Train and test both variants in `out/dropout` and `out/no-dropout`; write `out/compare.png`
    and the rows as `out/compare.json`.

    Returns one summary row per variant (None on DDP ranks other than 0).
    """
    rows, curves = [], {}
    with claimed_run_dir(out) as base:
        for name, dropout in VARIANTS:
            variant = s.replace(dropout=dropout)
            fitted = run_fit(variant, out=base / name)
            _, report = run_test(fitted.best_checkpoint, variant.evaluation_run(), fitted.run_dir)
            if report is None:  # not rank 0
                continue
            history = fitted.history
            curves[name] = history
            last = history[-1] if history else {}
            rows.append(
                {
                    "model": name,
                    "test_acc": report["accuracy"],
                    "test_loss": report["loss"],
                    "best_epoch": fitted.best_epoch,
                    "gap": last.get("train/acc", float("nan")) - last.get("val/acc", float("nan")),
                    "run_dir": str(fitted.run_dir),
                }
            )
        if not rows:
            return None
        plot_compare(curves, base / COMPARE_PLOT)
        (base / COMPARE_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    return rows
