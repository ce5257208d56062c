"""The `fmnist` command line: thin Typer commands over the library.

Each command parses its options, validates them into settings, calls one library function and
renders the result. The options are generated from the settings models' sections (`Settings` for
training, `EvaluationRun` for evaluating a checkpoint, `BenchConfig`) by `options.with_options`.

torch and lightning are imported inside the commands, after the settings are validated: `fmnist
--help` stays fast, and a mistyped option costs a fraction of a second, not an import of torch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer._click.exceptions import NoArgsIsHelpError  # Typer's own copy of Click does not export it

from fmnist_lightning import __version__, render
from fmnist_lightning.cli_options import WholeSummariesGroup, with_options
from fmnist_lightning.errors import FmnistError, TrainingInterrupted, UsageError
from fmnist_lightning.hardware import close_process_group, is_global_zero
from fmnist_lightning.runs import SAMPLE_FILES, TEST_FILES, default_out_for, newest_best_checkpoint
from fmnist_lightning.settings import (
    BenchConfig,
    DataSettings,
    EvaluationRun,
    ServeRun,
    ServeSettings,
    Settings,
    fit_settings,
    from_options,
    resolve_settings,
)

app = typer.Typer(
    name="fmnist",
    cls=WholeSummariesGroup,
    help="Fashion-MNIST CNN experiments with PyTorch Lightning: data, fit, lr-find, tune, test, "
    "predict-samples, compare, bench, predict, export, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help, not Rich's panels: Rich's table gives each option five columns and, in 80
    # columns, cuts long option names ("--checkpoint-eve…"); Click's list wraps the text under them.
    rich_markup_mode=None,
)

_debug = False  # set by --debug on the root command: show tracebacks instead of one-line errors


# ---------------------------------------------------------------------------------------------
# Plumbing: errors as one line, options generated from the settings models


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn FmnistError into one red line on stderr and its exit code (a traceback with --debug)."""
    try:
        yield
    except FmnistError as exc:
        if _debug:
            raise
        if is_global_zero():  # under DDP every process fails alike; one message is enough
            render.problem("interrupted" if isinstance(exc, TrainingInterrupted) else "error", str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _stopped_by_ctrl_c()
    except SystemExit as exc:
        # Lightning turns a KeyboardInterrupt inside a Trainer call (data setup before training,
        # `trainer.test`) into exit(1); it is still the user's Ctrl-C.
        if isinstance(exc.__context__, KeyboardInterrupt):
            _stopped_by_ctrl_c()
        raise


def _stopped_by_ctrl_c() -> NoReturn:
    """Ctrl-C outside the training loop (inside it, training saves a checkpoint and raises
    TrainingInterrupted). A fit that had not started has already removed its run folder."""
    if _debug:
        traceback.print_exc()
    if is_global_zero():
        render.problem("interrupted", "stopped by Ctrl-C")
    raise typer.Exit(TrainingInterrupted.exit_code)


def _version(value: bool) -> None:
    if value:
        render.console.print(f"fmnist-lightning {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full Python tracebacks for errors.")] = False,
) -> None:
    """Fashion-MNIST CNN experiments with PyTorch Lightning."""
    global _debug
    _debug = debug
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def quiet_lightning() -> None:
    """Import lightning, then hide its start-up chatter (GPU available, tips); --debug keeps it.
    Called by each command once its settings are valid.

    Lightning sets its loggers to INFO when imported, so this must run after the import. Its
    package logger also brings a console handler of its own: its messages would be printed
    twice, by that handler and by ours (the root logger's). Ours alone prints them.
    """
    import lightning  # noqa: F401

    logging.getLogger("lightning").handlers.clear()
    if not _debug:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # A torch/Lightning version mismatch warning that tells a user nothing actionable.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        if "SLURM_JOB_ID" not in os.environ:
            # Lightning's "srun is available but not used" hint can only help inside a SLURM
            # allocation; on a login node or a workstation with SLURM installed it is noise.
            warnings.filterwarnings("ignore", message="The `srun` command is available on your system")


OutOption = Annotated[
    Optional[Path], typer.Option("--out", help="Output folder. Default: the checkpoint's run folder.")
]
CkptOption = Annotated[Path, typer.Option("--ckpt", help="Checkpoint file, e.g. runs/001/checkpoints/best.ckpt.")]
NewestCkptOption = Annotated[
    Optional[Path],
    typer.Option("--ckpt", help="Checkpoint file. Default: the newest run's best.ckpt in runs/.", show_default=False),
]
ConfigOption = Annotated[Optional[Path], typer.Option(help="YAML file of settings (keys = option names).")]


# ---------------------------------------------------------------------------------------------
# Commands


@app.command()
@with_options(EvaluationRun, DataSettings.model_fields)
def data(
    given: dict[str, Any],
    out: Annotated[Path, typer.Option(help="Where to write samples.png.")] = Path("runs/data"),
) -> None:
    """Analyse the data: split shapes, pixel range, images per class, and a grid of samples."""
    with user_errors():
        settings = from_options(EvaluationRun, given)
        quiet_lightning()
        from fmnist_lightning.data import CLASS_NAMES
        from fmnist_lightning.evaluation import analyse_data

        analysis = analyse_data(settings.data, out)
        render.data_summary(analysis.source, analysis.summary, CLASS_NAMES)
        render.wrote(analysis.samples_png)


@app.command()
@with_options(Settings)
def fit(
    given: dict[str, Any],
    config: ConfigOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder. Default: a new numbered folder under runs/.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run already in --out (its files only).")
    ] = False,
    test: Annotated[
        bool, typer.Option("--test", help="After training, evaluate the best checkpoint on the test set.")
    ] = False,
) -> None:
    """Train the CNN. Settings come from defaults, then --config, then the options given here."""
    with user_errors():
        s = fit_settings(config, given, out, resume)
        if test and s.run.fast_dev_run:
            raise UsageError("--fast-dev-run already tests one batch and keeps no checkpoint; drop --test")
        quiet_lightning()
        from fmnist_lightning.training import run_fit

        result = run_fit(s, out=out, resume=resume, overwrite=overwrite)
        if result.is_global_zero:
            render.fit_summary(result)
        if test:  # every rank: under DDP the test is distributed too
            _test(result.best_checkpoint, s.evaluation_run(), result.run_dir)
        close_process_group()


@app.command("lr-find")
@with_options(Settings)
def lr_find(
    given: dict[str, Any],
    config: ConfigOption = None,
    out: Annotated[Path, typer.Option(help="Where to write lr_find.png.")] = Path("runs/lr-find"),
    steps: Annotated[
        int, typer.Option(min=2, help="Optimiser steps of the range test (one learning rate each).")
    ] = 100,
    min_lr: Annotated[float, typer.Option(help="Learning rate of the first step.")] = 1e-8,
    max_lr: Annotated[float, typer.Option(help="Learning rate of the last step.")] = 1.0,
) -> None:
    """Find a learning rate: Lightning's range test on the settings `fit` would use (all its options).

    Trains --steps steps with the learning rate growing from --min-lr to --max-lr, plots the loss
    against it (lr_find.png, the suggestion marked) and prints the `fmnist fit` line that uses it.
    """
    with user_errors():
        s = resolve_settings(config, given)
        quiet_lightning()
        from fmnist_lightning.lr_find import fit_command, format_lr, run_lr_find

        result = run_lr_find(s, out, steps, min_lr, max_lr)
        render.lr_find(format_lr(result.suggestion), result.steps, fit_command(config, given, result.suggestion))
        render.wrote(result.plot)


@app.command()
@with_options(EvaluationRun)
def test(given: dict[str, Any], ckpt: NewestCkptOption = None, out: OutOption = None) -> None:
    """Evaluate a checkpoint on the 10,000 test images: loss, accuracy, classification report."""
    with user_errors():
        settings = from_options(EvaluationRun, given)
        ckpt = _checkpoint(ckpt)
        _test(ckpt, settings, out or default_out_for(ckpt))


def _checkpoint(ckpt: Path | None) -> Path:
    """--ckpt, or the newest run's best checkpoint (said so)."""
    if ckpt is not None:
        return ckpt
    newest = newest_best_checkpoint()
    render.using_checkpoint(newest)
    return newest


def _test(ckpt: Path, s: EvaluationRun, out: Path) -> None:
    quiet_lightning()
    from fmnist_lightning.data import CLASS_NAMES
    from fmnist_lightning.evaluation import run_test
    from fmnist_lightning.runs import check_output_dir

    check_output_dir(out)
    _, report = run_test(ckpt, s, out)
    if report is not None:
        render.test_report(report, CLASS_NAMES)
        render.wrote(*(out / name for name in TEST_FILES))


@app.command("predict-samples")
@with_options(EvaluationRun)
def predict_samples(
    given: dict[str, Any],
    ckpt: NewestCkptOption = None,
    num: Annotated[int, typer.Option(help="How many correct and how many incorrect images to show (1-100).")] = 9,
    out: OutOption = None,
) -> None:
    """Show correctly and incorrectly classified test images (correct.png, incorrect.png)."""
    with user_errors():
        settings = from_options(EvaluationRun, given)
        ckpt = _checkpoint(ckpt)
        out = out or default_out_for(ckpt)
        quiet_lightning()
        from fmnist_lightning.evaluation import predict_samples as run_predict_samples

        picked = run_predict_samples(ckpt, settings, num, out)
        if picked is not None:
            render.samples(picked, num, [out / name for name in SAMPLE_FILES])


@app.command()
@with_options(Settings, exclude=("dropout",))
def compare(
    given: dict[str, Any],
    config: ConfigOption = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Folder for both runs. Default: a new numbered folder under runs/.")
    ] = None,
) -> None:
    """Train the same configuration with and without dropout, test both, and compare."""
    with user_errors():
        s = resolve_settings(config, given)
        quiet_lightning()
        from fmnist_lightning.compare import run_compare

        rows = run_compare(s, out)
        if rows is not None:
            render.compare(rows)


@app.command()
@with_options(Settings)
def tune(
    given: dict[str, Any],
    space: Annotated[
        Path,
        typer.Option(help="YAML search space: setting names to {low, high[, log]} or {choices}.", show_default=False),
    ],
    config: ConfigOption = None,
    trials: Annotated[
        int, typer.Option(min=1, help="Trials in the study, all workers together (a rerun continues up to N).")
    ] = 20,
    timeout: Annotated[
        Optional[float], typer.Option(min=0, help="Start no new trial after this many seconds.", show_default="none")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Study folder. Default: runs/tune-SPACE (SPACE: the space file's name).")
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(
            help="Optuna storage URL shared by several workers, e.g. postgresql://host/db.",
            show_default="sqlite study.db in the study folder",
        ),
    ] = None,
    study_name: Annotated[
        Optional[str], typer.Option(help="Study name in the storage.", show_default="the study folder's name")
    ] = None,
) -> None:
    """Search settings with Optuna: TPE sampling, median pruning on val/acc, each trial a run folder.

    Writes trials.csv, best.yaml (for fit --config) and plots into the study folder. Ctrl-C ends the
    current trial as pruned; the same command again continues the study.
    """
    with user_errors():
        from fmnist_lightning.space import load_space

        base = resolve_settings(config, given)
        params = load_space(space, base)
        quiet_lightning()
        from fmnist_lightning.tune import require_optuna, run_tune

        require_optuna()
        study_dir = out or Path("runs") / f"tune-{space.stem}"
        render.tune_summary(run_tune(base, params, trials, study_dir, timeout, storage, study_name))


@app.command()
@with_options(BenchConfig)
def bench(
    given: dict[str, Any],
    json_path: Annotated[
        Optional[Path], typer.Option("--json", help="Also write all results to this JSON file.")
    ] = None,
) -> None:
    """Benchmark training and evaluation speed: raw PyTorch vs fmnist vs a typical tutorial pipeline."""
    with user_errors():
        cfg = from_options(BenchConfig, given)
        quiet_lightning()
        from fmnist_lightning.bench import run_benchmark
        from fmnist_lightning.runs import check_output_dir

        if json_path is not None:
            check_output_dir(json_path.parent)
        result = run_benchmark(cfg, on_path=lambda p: render.err_console.print(f"[bold]benchmarking {p}...[/]"))
        render.bench(result)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
            render.wrote(json_path)


@app.command()
@with_options(EvaluationRun, ("accelerator", "eval_batch_size"))
def predict(
    given: dict[str, Any],
    ckpt: CkptOption,
    images: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE_OR_FOLDER", help="PNG or JPEG files, or folders of them.", show_default=False),
    ],
    invert: Annotated[
        bool,
        typer.Option(
            "--invert/--no-invert",
            help="Invert images with a light background (Fashion-MNIST shows light objects on black).",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the predictions as JSON instead of a table.")] = False,
) -> None:
    """Classify your own images: the top 3 classes and their probabilities for each.

    Each image is made to look like Fashion-MNIST: grayscale, the object cropped and scaled to fit
    28x28 keeping its aspect ratio (a 28x28 image is taken as is), inverted if its background is light.
    Images go through the model in batches of --eval-batch-size, on the first GPU when there is one.
    Unreadable files are reported one line each; the exit code is then 1.
    """
    with user_errors():
        settings = from_options(EvaluationRun, given)
        quiet_lightning()
        from fmnist_lightning.inference import classify

        predictions, problems = classify(ckpt, images, settings.hardware, settings.evaluation.eval_batch_size, invert)
        for problem in problems:
            render.problem("error", str(problem))
        rows = [(str(p.path), p.top(3)) for p in predictions]
        if as_json:
            listed = [
                {"file": f, "top3": [{"class": c, "probability": round(v, 6)} for c, v in top]} for f, top in rows
            ]
            typer.echo(json.dumps(listed, indent=2))
        elif rows:
            render.predictions(rows)
        if problems:
            raise typer.Exit(1)


@app.command()
@with_options(EvaluationRun, DataSettings.model_fields)
def export(
    given: dict[str, Any],
    ckpt: CkptOption,
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.", show_default=False)],
    out: Annotated[
        Optional[Path],
        typer.Option(help="Output file. Default: model.onnx or model.torchscript.pt in the checkpoint's run folder."),
    ] = None,
) -> None:
    """Export the network for use without this package: ONNX (needs the 'export' extra) or TorchScript.

    The exported model takes float images in [0, 1] shaped (batch, 1, 28, 28), any batch size, and
    returns logits (batch, 10): apply softmax for probabilities. It is checked against PyTorch on
    1000 test images; the command fails if they disagree.
    """
    with user_errors():
        settings = from_options(EvaluationRun, given)
        quiet_lightning()
        from fmnist_lightning.inference import EXPORT_EXTRA_HINT, EXPORT_TOLERANCE, export_checkpoint

        result = export_checkpoint(ckpt, fmt, out, settings.data)
        render.export_summary(result.path, fmt, result, EXPORT_EXTRA_HINT, EXPORT_TOLERANCE)


@app.command()
@with_options(ServeRun, ("accelerator", *ServeSettings.model_fields))
def serve(given: dict[str, Any], ckpt: NewestCkptOption = None) -> None:
    """Serve the model over HTTP (LitServe): POST /predict an image, GET /health, and a web page at /.

    Needs the 'serve' extra. Requests are preprocessed exactly as `fmnist predict` does it and
    batched on the server. Ctrl-C or SIGTERM stops it.
    """
    with user_errors():
        settings = from_options(ServeRun, given)
        ckpt = _checkpoint(ckpt)
        quiet_lightning()
        from fmnist_lightning.serve import serve_checkpoint

        serve_checkpoint(ckpt, settings, announce=render.serving)
        render.err_console.print("stopped")


@app.command()
@with_options(EvaluationRun)
def report(
    given: dict[str, Any],
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder, e.g. runs/001.", show_default=False)],
) -> None:
    """Write RUN_DIR/report.html: settings, learning curves, test report, confusion matrix, sample images.

    Runs `test` and `predict-samples` first when their files are missing or older than the checkpoint.
    """
    with user_errors():
        settings = from_options(EvaluationRun, given)
        quiet_lightning()
        from fmnist_lightning.data import CLASS_NAMES
        from fmnist_lightning.evaluation import make_report

        update = make_report(run_dir, settings)
        if update.report is not None:
            render.test_report(update.report, CLASS_NAMES)
            render.wrote(*(run_dir / name for name in TEST_FILES))
        if update.samples is not None:
            render.samples(update.samples, 9, [run_dir / name for name in SAMPLE_FILES])
        if update.page is not None:
            render.wrote(update.page)


def main(args: list[str] | None = None) -> None:
    """Entry point: command-line usage errors also become one line (exit 2) instead of a panel."""
    try:
        result = app(args=args, standalone_mode=False, prog_name="fmnist")
    except typer.Abort:
        sys.exit(130)
    except NoArgsIsHelpError as exc:  # a bare `fmnist`: the "error" is the help
        typer.echo(exc.format_message())
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Typer's (click's) usage errors carry `format_message` and `exit_code`; anything else is a bug.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        render.problem("error", exc.format_message())
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else 0)
