"""The `fmnist` command line: thin Typer commands over the library.

Each command body calls one library function and renders its result. `cli_options.command` does
what every command shares: the options generated from the settings models (`Settings` for
training, `EvaluationRun` for evaluating a checkpoint, `ServeRun`, `BenchConfig`), their validation
(over `--config` where a command has it), Lightning's chatter hidden, and errors as one line.

torch and lightning are imported inside the commands, after the settings are validated: `fmnist
--help` stays fast, and a mistyped option costs a fraction of a second, not an import of torch.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer import Argument, Option

from fmnist_lightning import render
from fmnist_lightning.cli_options import (
    DEBUG,
    CkptOption,
    ConfigOption,
    NewestCkptOption,
    OutOption,
    WholeSummariesGroup,
    command,
    given_or_newest,
    print_version,
    run_app,
)
from fmnist_lightning.hardware import close_process_group
from fmnist_lightning.runs import SAMPLE_FILES, TEST_FILES, default_out_for
from fmnist_lightning.settings import (
    BenchConfig,
    DataSettings,
    EvaluationRun,
    ResultsSettings,
    ServeRun,
    ServeSettings,
    Settings,
    fit_settings,
)

app = typer.Typer(
    name="fmnist",
    cls=WholeSummariesGroup,
    help="Fashion-MNIST CNN experiments with PyTorch Lightning: data, fit, lr-find, test, predict-samples, "
    "compare, tune, bench, predict, export, serve, report, results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help, not Rich's panels: Rich's table gives each option five columns and, in 80
    # columns, cuts long option names ("--checkpoint-eve…"); Click's list wraps the text under them.
    rich_markup_mode=None,
)


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, Option("--version", callback=print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, Option("--debug", help="Show full Python tracebacks for errors.")] = False,
) -> None:
    """Fashion-MNIST CNN experiments with PyTorch Lightning."""
    ctx.meta[DEBUG] = debug  # read by every command (cli_options.command)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _test(ckpt: Path, settings: EvaluationRun, out: Path) -> None:
    """`fmnist test`, also after `fmnist fit --test`."""
    from fmnist_lightning.evaluation import run_test

    _show_test_report(run_test(ckpt, settings, out)[1], out)


def _show_test_report(report: dict[str, Any] | None, out: Path) -> None:
    """A test's report and the files it wrote into `out` (nothing on DDP ranks other than 0)."""
    from fmnist_lightning.data import CLASS_NAMES

    if report is not None:
        render.test_report(report, CLASS_NAMES)
        render.wrote(*(out / name for name in TEST_FILES))


# ---------------------------------------------------------------------------------------------
# Commands


@app.command()
@command(EvaluationRun, DataSettings.model_fields)
def data(
    settings: EvaluationRun,
    out: Annotated[Path, Option(help="Where to write samples.png.")] = Path("runs/data"),
) -> None:
    """Analyse the data: split shapes, pixel range, images per class, and a grid of samples."""
    from fmnist_lightning.data import CLASS_NAMES
    from fmnist_lightning.evaluation import analyse_data

    analysis = analyse_data(settings.data, out)
    render.data_summary(analysis.source, analysis.summary, CLASS_NAMES)
    render.wrote(analysis.samples_png)


@app.command()
@command(Settings, resolve=lambda given, p: fit_settings(p["config"], given, p["out"], p["resume"], p["test"]))
def fit(
    settings: Settings,
    config: ConfigOption = None,
    out: Annotated[Path | None, Option(help="Run folder. Default: a new numbered folder under runs/.")] = None,
    resume: Annotated[bool, Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[
        bool, Option("--overwrite", help="Replace the run already in --out (its files only).")
    ] = False,
    test: Annotated[
        bool, Option("--test", help="After training, evaluate the best checkpoint on the test set.")
    ] = False,
) -> None:
    """Train the CNN. Settings come from defaults, then --config, then the options given here."""
    from fmnist_lightning.training import run_fit

    result = run_fit(settings, out=out, resume=resume, overwrite=overwrite)
    if result.is_global_zero:
        render.fit_summary(result)
    if test:  # every rank: under DDP the test is distributed too
        _test(result.best_checkpoint, settings.evaluation_run(), result.run_dir)
    close_process_group()


@app.command("lr-find")
@command(Settings)
def lr_find(
    settings: Settings,
    given: dict[str, Any],
    config: ConfigOption = None,
    out: Annotated[Path, Option(help="Where to write lr_find.png.")] = Path("runs/lr-find"),
    steps: Annotated[int, Option(min=2, help="Optimiser steps of the range test (one learning rate each).")] = 100,
    min_lr: Annotated[float, Option(help="Learning rate of the first step.")] = 1e-8,
    max_lr: Annotated[float, Option(help="Learning rate of the last step.")] = 1.0,
) -> None:
    """Find a learning rate: Lightning's range test on the settings `fit` would use (all its options).

    Trains --steps steps with the learning rate growing from --min-lr to --max-lr, plots the loss
    against it (lr_find.png, the suggestion marked) and prints the `fmnist fit` line that uses it.
    """
    from fmnist_lightning.lr_find import fit_command, format_lr, run_lr_find

    result = run_lr_find(settings, out, steps, min_lr, max_lr)
    render.lr_find(format_lr(result.suggestion), result.steps, fit_command(config, given, result.suggestion))
    render.wrote(result.plot)


@app.command()
@command(EvaluationRun)
def test(settings: EvaluationRun, ckpt: NewestCkptOption = None, out: OutOption = None) -> None:
    """Evaluate a checkpoint on the 10,000 test images: loss, accuracy, classification report."""
    ckpt = given_or_newest(ckpt)
    _test(ckpt, settings, out or default_out_for(ckpt))


@app.command("predict-samples")
@command(EvaluationRun)
def predict_samples(
    settings: EvaluationRun,
    ckpt: NewestCkptOption = None,
    num: Annotated[int, Option(help="How many correct and how many incorrect images to show (1-100).")] = 9,
    out: OutOption = None,
) -> None:
    """Show correctly and incorrectly classified test images (correct.png, incorrect.png)."""
    from fmnist_lightning.evaluation import predict_samples as run_predict_samples

    ckpt = given_or_newest(ckpt)
    out = out or default_out_for(ckpt)
    picked = run_predict_samples(ckpt, settings, num, out)
    if picked is not None:
        render.samples(picked, num, [out / name for name in SAMPLE_FILES])


@app.command()
@command(Settings, exclude=("dropout",))
def compare(
    settings: Settings,
    config: ConfigOption = None,
    out: Annotated[
        Path | None, Option(help="Folder for both runs. Default: a new numbered folder under runs/.")
    ] = None,
) -> None:
    """Train the same configuration with and without dropout, test both, and compare."""
    from fmnist_lightning.compare import run_compare

    rows = run_compare(settings, out)
    if rows is not None:
        render.compare(rows)


@app.command()
@command(Settings)
def tune(
    settings: Settings,
    space: Annotated[
        Path, Option(help="YAML search space: setting names to {low, high[, log]} or {choices}.", show_default=False)
    ],
    config: ConfigOption = None,
    trials: Annotated[
        int, Option(min=1, help="Trials in the study, all workers together (a rerun continues up to N).")
    ] = 20,
    timeout: Annotated[
        float | None, Option(min=0, help="Start no new trial after this many seconds.", show_default="none")
    ] = None,
    out: Annotated[
        Path | None, Option(help="Study folder. Default: runs/tune-SPACE (SPACE: the space file's name).")
    ] = None,
    storage: Annotated[
        str | None,
        Option(
            help="Optuna storage URL shared by several workers, e.g. postgresql+psycopg://user@host/db.",
            show_default="sqlite study.db in the study folder",
        ),
    ] = None,
    study_name: Annotated[
        str | None, Option(help="Study name in the storage.", show_default="the study folder's name")
    ] = None,
) -> None:
    """Search settings with Optuna: TPE sampling, median pruning on val/acc, each trial a run folder.

    Writes trials.csv, best.yaml (for fit --config) and plots into the study folder. Ctrl-C ends the
    current trial as pruned; the same command again continues the study.
    """
    from fmnist_lightning.tune import run_tune

    render.tune_summary(run_tune(settings, space, trials, out, timeout, storage, study_name))


@app.command()
@command(BenchConfig)
def bench(
    settings: BenchConfig,
    json_path: Annotated[Path | None, Option("--json", help="Also write all results to this JSON file.")] = None,
) -> None:
    """Benchmark training and evaluation speed: raw PyTorch vs fmnist vs a typical tutorial pipeline."""
    from fmnist_lightning.bench import run_benchmark

    result = run_benchmark(settings, lambda p: render.err_console.print(f"[bold]benchmarking {p}...[/]"), json_path)
    render.bench(result)
    if json_path:
        render.wrote(json_path)


@app.command()
@command(EvaluationRun, ("accelerator", "eval_batch_size"))
def predict(
    settings: EvaluationRun,
    ckpt: CkptOption,
    images: Annotated[
        list[Path],
        Argument(metavar="IMAGE_OR_FOLDER", help="PNG or JPEG files, or folders of them.", show_default=False),
    ],
    invert: Annotated[
        bool,
        Option(
            "--invert/--no-invert",
            help="Invert images with a light background (Fashion-MNIST shows light objects on black).",
        ),
    ] = True,
    as_json: Annotated[bool, Option("--json", help="Print the predictions as JSON instead of a table.")] = False,
) -> None:
    """Classify your own images: the top 3 classes and their probabilities for each.

    Each image is made to look like Fashion-MNIST: grayscale, the object cropped and scaled to fit
    28x28 keeping its aspect ratio (a 28x28 image is taken as is), inverted if its background is light.
    Images go through the model in batches of --eval-batch-size, on the first GPU when there is one.
    Unreadable files are reported one line each; the exit code is then 1.
    """
    from fmnist_lightning.inference import classify, predictions_json

    predictions, problems = classify(ckpt, images, settings.hardware, settings.evaluation.eval_batch_size, invert)
    for problem in problems:
        render.problem("error", str(problem))
    if as_json:
        typer.echo(predictions_json(predictions))
    elif predictions:
        render.predictions([(str(p.path), p.top(3)) for p in predictions])
    if problems:
        raise typer.Exit(1)


@app.command()
@command(EvaluationRun, DataSettings.model_fields)
def export(
    settings: EvaluationRun,
    ckpt: CkptOption,
    fmt: Annotated[str, Option("--format", help="onnx or torchscript.", show_default=False)],
    out: Annotated[
        Path | None,
        Option(help="Output file. Default: model.onnx or model.torchscript.pt in the checkpoint's run folder."),
    ] = None,
) -> None:
    """Export the network for use without this package: ONNX (needs the 'export' extra) or TorchScript.

    The exported model takes float images in [0, 1] shaped (batch, 1, 28, 28), any batch size, and
    returns logits (batch, 10): apply softmax for probabilities. It is checked against PyTorch on
    1000 test images; the command fails if they disagree.
    """
    from fmnist_lightning.inference import EXPORT_EXTRA_HINT, EXPORT_TOLERANCE, export_checkpoint

    result = export_checkpoint(ckpt, fmt, out, settings.data)
    render.export_summary(result.path, fmt, result, EXPORT_EXTRA_HINT, EXPORT_TOLERANCE)


@app.command()
@command(ServeRun, ("accelerator", *ServeSettings.model_fields))
def serve(settings: ServeRun, ckpt: NewestCkptOption = None) -> None:
    """Serve the model over HTTP (LitServe): POST /predict an image, GET /health, and a web page at /.

    Needs the 'serve' extra. Requests are preprocessed exactly as `fmnist predict` does it and
    batched on the server. Ctrl-C or SIGTERM stops it.
    """
    from fmnist_lightning.serve import serve_checkpoint

    serve_checkpoint(given_or_newest(ckpt), settings, announce=render.serving)
    render.err_console.print("stopped")


@app.command()
@command(EvaluationRun)
def report(
    settings: EvaluationRun,
    run_dir: Annotated[Path, Argument(metavar="RUN_DIR", help="Run folder, e.g. runs/001.", show_default=False)],
) -> None:
    """Write RUN_DIR/report.html: settings, learning curves, test report, confusion matrix, sample images.

    Runs `test` and `predict-samples` first when their files are missing or older than the checkpoint.
    """
    from fmnist_lightning.evaluation import make_report

    update = make_report(run_dir, settings)
    _show_test_report(update.report, run_dir)
    if update.samples is not None:
        render.samples(update.samples, 9, [run_dir / name for name in SAMPLE_FILES])
    if update.page is not None:
        render.wrote(update.page)


@app.command()
@command(ResultsSettings)
def results(
    settings: ResultsSettings,
    run_dirs: Annotated[
        list[Path], Argument(metavar="RUN_DIR...", help="Run folders, e.g. runs/repro/*.", show_default=False)
    ],
    json_path: Annotated[Path | None, Option("--json", help="Also write the rows to this JSON file.")] = None,
) -> None:
    """Time to accuracy from run folders, without retraining: one row per recipe, its seeds pooled.

    Test accuracy (mean +- std, from report.json), epochs, training minutes, and the minutes until
    validation accuracy first reached each --targets.
    """
    from fmnist_lightning.results import results as read_results

    recipes = read_results(run_dirs, settings.targets)
    render.results(recipes, settings.targets)
    if json_path:
        json_path.write_text(json.dumps([r.to_json() for r in recipes], indent=2) + "\n")
        render.wrote(json_path)


def main(args: list[str] | None = None) -> None:
    """Entry point (`fmnist`)."""
    run_app(app, args)
