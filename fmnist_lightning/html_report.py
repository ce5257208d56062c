"""`fmnist report`: one self-contained HTML page about a run, built from the files the other commands
wrote, and the rule for when those files must be remade first.

Rendering imports neither torch nor lightning (a test checks it): a finished run's page can be
written anywhere the run folder can be read.

The page has no scripts and no external resources (figures are embedded as base64 PNGs), so it can
be mailed, archived or opened offline as a single file.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from fmnist_lightning.errors import FmnistError, UsageError
from fmnist_lightning.runs import (
    BEST_CHECKPOINT,
    CONFIG,
    CONFUSION_MATRIX,
    CORRECT_SAMPLES,
    CURVES,
    FIT_FILES,
    HTML_REPORT,
    INCORRECT_SAMPLES,
    METRICS,
    SAMPLE_FILES,
    TEST_REPORT,
    best_row,
    read_metrics,
)
from fmnist_lightning.settings import read_config

# What the page shows of `fmnist test`'s outputs (not predictions.csv).
TEST_INPUTS = (TEST_REPORT, CONFUSION_MATRIX)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.7rem; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tfoot tr:first-child td { border-top: 2px solid #bbb; }
table.key-value td { text-align: left; }
img { max-width: 100%; }
.muted { color: #777; }
"""


def needs_update(run_dir: Path, names: tuple[str, ...], checkpoint: Path) -> bool:
    """Whether any of the files is missing or older than the checkpoint (e.g. after `fit --resume`)."""
    paths = [run_dir / name for name in names]
    if not all(p.is_file() for p in paths):
        return True
    return checkpoint.is_file() and min(p.stat().st_mtime for p in paths) < checkpoint.stat().st_mtime


def stale_outputs(run_dir: Path) -> tuple[bool, bool]:
    """Whether `fmnist test`'s and `predict-samples`' outputs must be remade before the page is
    written: missing, or older than the run's best checkpoint. (Without a checkpoint, nothing can be.)"""
    ckpt = run_dir / BEST_CHECKPOINT
    if not ckpt.is_file():
        return False, False
    return needs_update(run_dir, TEST_INPUTS, ckpt), needs_update(run_dir, SAMPLE_FILES, ckpt)


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _key_value_table(rows: dict[str, Any], table_id: str) -> str:
    body = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(value))}</td></tr>" for key, value in rows.items()
    )
    return f'<table id="{table_id}" class="key-value"><tbody>{body}</tbody></table>'


def _scores_row(name: str, row: dict[str, Any]) -> str:
    cells = "".join(f"<td>{row[k]:.4f}</td>" for k in ("precision", "recall", "f1"))
    return f"<tr><td>{html.escape(name)}</td>{cells}<td>{row['support']}</td></tr>"


def _classification_table(report: dict[str, Any]) -> str:
    """The same table as `fmnist test` prints: one row per class, then accuracy and the averages."""
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>f1-score</th><th>support</th></tr>"
    classes = "".join(_scores_row(name, row) for name, row in report["per_class"].items())
    totals = (
        f"<tr><td>accuracy</td><td></td><td></td><td>{report['accuracy']:.4f}</td><td>{report['num_samples']}</td></tr>"
        + _scores_row("macro avg", report["macro_avg"])
        + _scores_row("weighted avg", report["weighted_avg"])
    )
    return (
        f'<table id="classification-report"><thead>{head}</thead>'
        f'<tbody class="classes">{classes}</tbody><tfoot>{totals}</tfoot></table>'
    )


def _summary(metrics: list[dict[str, float]], report: dict[str, Any]) -> dict[str, str]:
    best = best_row(metrics)
    summary = {"epochs trained": str(len(metrics))}
    if "val/acc" in best:
        summary["best epoch"] = f"{int(best['epoch'])} (val accuracy {best['val/acc']:.4f})"
    summary["test accuracy"] = f"{report['accuracy']:.4f} on {report['num_samples']} images"
    summary["test loss"] = f"{report['loss']:.4f}"
    return summary


def render_report(run_dir: Path) -> str:
    """The report page as HTML text (raises FmnistError naming any missing input file)."""
    if not (run_dir / CONFIG).is_file():
        raise UsageError(f"{run_dir} is not a run folder (no {CONFIG}); give a folder `fmnist fit` wrote")
    missing = [name for name in (*FIT_FILES, *TEST_INPUTS, *SAMPLE_FILES) if not (run_dir / name).is_file()]
    if missing:
        raise FmnistError(
            f"{run_dir} lacks {', '.join(missing)}: `fmnist fit` writes {', '.join(FIT_FILES)}, `fmnist test` "
            f"{', '.join(TEST_INPUTS)} and `fmnist predict-samples` {', '.join(SAMPLE_FILES)} (`fmnist report` "
            f"runs the last two itself when {BEST_CHECKPOINT} exists)"
        )
    config, provenance = read_config(run_dir / CONFIG)
    report = json.loads((run_dir / TEST_REPORT).read_text(encoding="utf-8"))
    metrics = read_metrics(run_dir / METRICS)
    title = f"Fashion-MNIST run {run_dir.resolve().name}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">{html.escape(str(run_dir.resolve()))}</p>',
        "<h2>Summary</h2>",
        _key_value_table(_summary(metrics, report), "summary"),
        "<h2>Settings</h2>",
        _key_value_table(config, "settings"),
    ]
    if provenance:
        sections += ['<p class="muted">Ran with:</p>', _key_value_table(provenance, "provenance")]
    sections += [
        "<h2>Learning curves</h2>",
        _image(run_dir / CURVES, "Training and validation loss and accuracy per epoch"),
        "<h2>Test set: classification report</h2>",
        _classification_table(report),
        "<h2>Confusion matrix</h2>",
        _image(run_dir / CONFUSION_MATRIX, "Confusion matrix of the test set"),
        "<h2>Correctly classified test images</h2>",
        _image(run_dir / CORRECT_SAMPLES, "Correctly classified test images"),
        "<h2>Incorrectly classified test images</h2>",
        _image(run_dir / INCORRECT_SAMPLES, "Incorrectly classified test images"),
    ]
    body = "\n".join(sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and return its path."""
    page = render_report(run_dir)
    path = run_dir / HTML_REPORT
    path.write_text(page, encoding="utf-8")
    return path
