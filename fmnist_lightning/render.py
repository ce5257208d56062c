"""What the commands print: rich tables and one-line messages, from plain results.

Nothing here computes anything; the library returns results and this module shows them. It
imports neither torch nor lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from fmnist_lightning.bench import BenchResult
    from fmnist_lightning.results import RecipeRow

console = Console()
err_console = Console(stderr=True)


def problem(label: str, message: str) -> None:
    """One line on stderr: `error: ...` (red) or `interrupted: ...` (yellow)."""
    style = "bold yellow" if label == "interrupted" else "bold red"
    err_console.print(f"[{style}]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def wrote(*paths: Path | str) -> None:
    console.print(f"wrote {', '.join(escape(str(p)) for p in paths)}")


def using_checkpoint(path: Path) -> None:
    console.print(f"using {escape(str(path))} (the newest run's best checkpoint; --ckpt chooses another)")


def data_summary(source: str, summary: Mapping[str, Any], class_names: Sequence[str]) -> None:
    table = Table(title=f"Fashion-MNIST ({source})")
    for column in ("split", "images", "labels (one-hot)", "pixel min", "pixel max"):
        table.add_column(column, justify="right")
    for split, row in summary.items():
        table.add_row(
            split, str(row.images_shape), str(row.targets_shape), f"{row.pixel_min:.1f}", f"{row.pixel_max:.1f}"
        )
    counts = Table(title="Images per class")
    counts.add_column("class")
    for split in summary:
        counts.add_column(split, justify="right")
    for i, name in enumerate(class_names):
        counts.add_row(name, *(str(row.per_class[i]) for row in summary.values()))
    console.print(table)
    console.print(counts)


def fit_summary(result: Any) -> None:
    if result.fast_dev_run:
        console.print("fast dev run passed: one batch each of training, validation and test; no files were kept")
        return
    table = Table(title=f"Run {result.run_dir}", show_header=False)
    table.add_row("best epoch", f"{result.best_epoch} of {result.epochs}")
    if result.stopped_early_after is not None:
        table.add_row("stopped early", f"after epoch {result.stopped_early_after}: {result.stop_reason}")
    if result.target_reached is not None:
        epoch, seconds = result.target_reached
        table.add_row("target val accuracy", f"reached at epoch {epoch}, after {seconds / 60:.2f} training minutes")
    table.add_row("best val accuracy", f"{result.best_val_acc:.4f}")
    table.add_row("best checkpoint", str(result.best_checkpoint))
    table.add_row("precision", result.precision)
    table.add_row("wall time", f"{result.wall_time_s:.1f} s")
    table.add_row("training speed", f"{result.images_per_s:,.0f} images/s")
    table.add_row("peak memory (RSS)", f"{result.peak_rss_mb:,.0f} MB")
    if result.gpu_peak_mb is not None:
        table.add_row("peak GPU memory (allocated)", f"{result.gpu_peak_mb:,.0f} MB")
    for path in result.profiles:
        table.add_row("profiler report", escape(str(path)))
    console.print(table)


def lr_find(suggestion: str, steps: int, command: str) -> None:
    console.print(f"suggested learning rate: {suggestion} (range test of {steps} steps)")
    console.print(f"train with it: {escape(command)}", soft_wrap=True)


def test_report(report: Mapping[str, Any], class_names: Sequence[str]) -> None:
    """The classification report and confusion matrix of `fmnist test`."""
    console.print(
        f"test loss {report['loss']:.4f}   test accuracy {report['accuracy']:.4f}   ({report['num_samples']} images"
        f"{', each averaged with its mirror image (--tta)' if report.get('tta') else ''})"
    )
    table = Table(title="Classification report")
    for column in ("", "precision", "recall", "f1-score", "support"):
        table.add_column(column, justify="right")
    for name, row in report["per_class"].items():
        table.add_row(name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    table.add_section()
    table.add_row("accuracy", "", "", f"{report['accuracy']:.4f}", str(report["num_samples"]))
    for key, label in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        row = report[key]
        table.add_row(label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    console.print(table)
    confusion = Table(title="Confusion matrix (rows: true class, columns: predicted)")
    confusion.add_column("")
    for i in range(len(class_names)):
        confusion.add_column(str(i), justify="right")
    for i, (name, row) in enumerate(zip(class_names, report["confusion_matrix"])):
        confusion.add_row(f"{i} {name}", *(str(v) for v in row))
    console.print(confusion)


def samples(picked: Mapping[str, list[int]], num: int, paths: Sequence[Path]) -> None:
    for name, indices in picked.items():
        console.print(f"{name} ({len(indices)}): {indices}")
        if len(indices) < num:
            console.print(f"  only {len(indices)} {name} predictions exist")
    console.print(f"wrote {' and '.join(escape(str(p)) for p in paths)}")


def compare(rows: Sequence[Mapping[str, Any]]) -> None:
    table = Table(title="Dropout vs no dropout")
    for column in ("model", "test acc", "test loss", "best epoch", "train-val acc gap (last epoch)"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["model"],
            f"{row['test_acc']:.4f}",
            f"{row['test_loss']:.4f}",
            str(row["best_epoch"]),
            f"{row['gap']:+.4f}",
        )
    console.print(table)


def results(recipes: Sequence[RecipeRow], targets: Sequence[float]) -> None:
    """Time-to-accuracy rows: one per recipe, its seeds pooled; where each ran below the table."""
    reach = "/".join(f"{100 * t:g}" for t in targets)
    table = Table(title="Time to accuracy")
    for column in ("recipe", "runs", "test %", "best val %", "epochs", "minutes", f"minutes to val\n{reach}%"):
        table.add_column(column, justify="right", no_wrap=column != "recipe", overflow="fold")
    for recipe in recipes:
        stats = recipe.test_mean_std()
        tested = f"{100 * stats[0]:.2f} +- {100 * stats[1]:.2f}" if stats else "not tested"
        if stats and any(r.tta for r in recipe.runs):
            tested += " TTA"
        if stats and len(recipe.tested) < len(recipe.runs):
            tested += f" ({len(recipe.tested)} tested)"
        reached = (recipe.minutes_to(t) for t in targets)
        table.add_row(
            escape(recipe.name),
            str(len(recipe.runs)),
            tested,
            f"{100 * recipe.mean('best_val_acc'):.2f}",
            recipe.distinct("epochs"),
            f"{recipe.mean('train_minutes'):.1f}",
            "/".join(f"{m:.1f}" if m is not None else "-" for m in reached),
        )
    console.print(table)
    console.print(
        "Means over the runs. Minutes: training only (the sum of metrics.csv's train_time_s), until validation "
        "accuracy first reached the target ('-': not every run did)."
    )
    for recipe in recipes:
        where = f"{recipe.distinct('precision')}; {recipe.distinct('cpu')}; commit {recipe.distinct('commit')}"
        console.print(f"{escape(recipe.name)}: {escape(where)}")


def bench(result: BenchResult) -> None:
    cfg, machine, rounds = result.config, result.machine, result.config.repeats
    title = (
        f"{result.device} ({machine.gpu or machine.cpu}, {machine.cpu_threads} threads), "
        f"{', '.join(result.precisions.values())}, batch {cfg.batch_size}, "
        f"{cfg.steps} steps after {cfg.warmup_steps} warm-up"
        f"{f', mean +- std of {rounds} rounds' if rounds > 1 else ''}; "
        f"torch {result.versions['torch']}, lightning {result.versions['lightning']}"
    )
    table = Table(title=title)
    columns = (
        "path",
        "train img/s",
        "warm-up s",
        "epoch s",
        "eval img/s",
        "eval batch",
        "eval engine",
        "peak RSS MB",
        "CUDA MB",
    )
    for column in columns:
        table.add_column(column, justify="right")

    def spread(mean: float, std: float) -> str:
        return f"{mean:,.0f}" + (f" +- {std:,.0f}" if rounds > 1 else "")

    for name, r in result.results.items():
        cuda = r.cuda_max_allocated_mb
        table.add_row(
            name,
            spread(r.train_images_per_s, r.train_images_per_s_std),
            f"{r.warmup_s:.1f}",
            f"{r.epoch_s:.1f}",
            spread(r.eval_images_per_s, r.eval_images_per_s_std),
            str(r.eval_batch_size),
            r.settings.get("eval_engine", "torch"),
            f"{r.peak_rss_mb:,.0f}",
            "-" if cuda is None else f"{cuda:,.0f}",
        )
    console.print(table)
    for ratio in result.ratios:
        if rounds > 1:
            per_round = ", ".join(f"{x:.2f}" for x in ratio.per_round)
            console.print(
                f"{ratio.name}: {ratio.mean:.2f}x +- {ratio.std:.2f}, median {ratio.median:.2f}x (rounds: {per_round})"
            )
        else:
            console.print(f"{ratio.name}: {ratio.mean:.2f}x")


def predictions(rows: Sequence[tuple[str, list[tuple[str, float]]]]) -> None:
    """One row per image: its file and its top 3 classes with their probabilities."""
    table = Table(title="Predictions (top 3 classes with probability)")
    for column in ("file", "1st", "2nd", "3rd"):
        table.add_column(column)
    for file, top in rows:
        table.add_row(escape(file), *(f"{c} {v:.4f}" for c, v in top))
    console.print(table)


def export_summary(path: Path, fmt: str, result: Any, extra_hint: str, tolerance: float) -> None:
    # ONNX tensors have names; a TorchScript module takes and returns plain tensors.
    input_name, output_name = (" 'images'", " 'logits'") if fmt == "onnx" else ("", "")
    console.print(f"wrote {escape(str(path))} ({fmt}, {path.stat().st_size / 1e6:.1f} MB)")
    console.print(f"  input{input_name}: float (batch, 1, 28, 28) in [0, 1], any batch size")
    console.print(f"  output{output_name}: float (batch, 10), the logits; softmax gives the class probabilities")
    if result.max_abs_diff is None:
        console.print(f"[yellow]not checked[/]: {result.runtime} is not installed ({escape(extra_hint)})")
    else:
        n = result.checked_images
        console.print(f"checked against PyTorch with {result.runtime} on {n} test images (batches of 1 and {n}):")
        console.print(f"  max |logit difference| {result.max_abs_diff:.2e} (tolerance {tolerance:g})")


def tune_summary(result: Any, top: int = 10) -> None:
    """The study's best trials (by best val/acc), its counts, and where best.yaml is."""
    rows = sorted((r for r in result.rows if r.val_acc is not None), key=lambda r: -r.val_acc)[:top]
    names = sorted({name for r in result.rows for name in r.params})
    counts = {state: sum(r.state == state for r in result.rows) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    title = (
        f"Study {result.study_name}: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
        + (f", {counts['RUNNING']} running" if counts["RUNNING"] else "")
        + f" (top {len(rows)} by best val/acc)"
    )
    table = Table(title=title)
    for column in ("trial", "state", *names, "best val/acc", "epochs", "wall s"):
        table.add_column(column, justify="right")
    for r in rows:
        values = [_param_text(r.params.get(n)) for n in names]
        table.add_row(
            str(r.number), r.state.lower(), *values, f"{r.val_acc:.4f}", str(r.epochs), f"{r.wall_time_s:.0f}"
        )
    console.print(table)
    if result.plots:
        wrote(result.study_dir / "trials.csv", *result.plots)
    if result.best_yaml is not None:
        console.print(
            f"best: trial {result.best.number} (val/acc {result.best.val_acc:.4f}); its settings: "
            f"{escape(str(result.best_yaml))} (fmnist fit --config {escape(str(result.best_yaml))})"
        )
    else:
        console.print("no trial completed yet: no best.yaml")


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'es' if thing.endswith('s') else 's'}" if number != 1 else f"1 {thing}"


def serving(options: Any) -> None:
    """What `fmnist serve` is about to serve, where, and whether it is open (a ServeOptions)."""
    host = f"[{options.host}]" if ":" in options.host else options.host
    batching = (
        f"batches of up to {options.max_batch_size} requests within {1000 * options.batch_timeout:g} ms"
        if options.max_batch_size > 1
        else "no batching"
    )
    err_console.print(
        f"serving {escape(str(options.ckpt))} at http://{host}:{options.port}/ ({options.engine} on "
        f"{options.accelerator}, {_count(options.workers, 'worker')}, {_count(options.api_servers, 'HTTP process')}, "
        f"{batching}, uploads up to {options.max_upload_mb:g} MB); Ctrl-C stops it",
        highlight=False,
        soft_wrap=True,
    )
    if options.api_key is None:
        err_console.print(
            f"open: no API key, anyone who can reach {host}:{options.port} can use it "
            "(--api-key or FMNIST_SERVE_API_KEY requires one)",
            highlight=False,
            soft_wrap=True,
        )
    else:
        err_console.print(
            "requests to /predict need the API key in their X-API-Key header (/health and the page are open)",
            highlight=False,
        )
