"""The `fmnist` command line: thin Typer commands over the library.

Options of `fit` and `compare` are generated from the fields of `config.Settings` (name, type,
default, help), so the YAML keys, the CLI options and `config.yaml` never drift apart. torch and
lightning are imported inside the commands: `fmnist --help` stays fast.
"""

from __future__ import annotations

import enum
import inspect
import logging
import sys
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fmnist_lightning import __version__
from fmnist_lightning.config import Settings, resolve_settings, setting_fields
from fmnist_lightning.errors import FmnistError, TrainingInterrupted, UsageError
from fmnist_lightning.run_files import BEST_CHECKPOINT, CHECKPOINT_DIR, SAMPLE_FILES, TEST_FILES

console = Console()
err_console = Console(stderr=True)
app = typer.Typer(
    name="fmnist",
    help="Fashion-MNIST CNN experiments with PyTorch Lightning: data, fit, test, predict-samples, compare, "
    "bench, predict, export, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

HARDWARE = ("accelerator", "devices", "strategy", "num_nodes", "precision", "gpus")
DATA = ("data_dir", "offline")
EVALUATION = ("eval_batch_size", "eval_engine")
DEFAULT_PATHS = "raw,fmnist,typical"
_debug = False  # set by --debug on the root command: show tracebacks instead of one-line errors


# ---------------------------------------------------------------------------------------------
# Plumbing: errors as one line, options generated from Settings


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn FmnistError into one red line on stderr and its exit code (a traceback with --debug)."""
    try:
        quiet_lightning()
        yield
    except FmnistError as exc:
        if _debug:
            raise
        from fmnist_lightning.training import is_rank_zero_process

        if not is_rank_zero_process():  # under DDP every process fails alike; one message is enough
            raise typer.Exit(exc.exit_code) from None
        label = "[bold yellow]interrupted:[/]" if isinstance(exc, TrainingInterrupted) else "[bold red]error:[/]"
        err_console.print(f"{label} {escape(str(exc))}", highlight=False, soft_wrap=True)
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
    from fmnist_lightning.training import is_rank_zero_process

    if _debug:
        traceback.print_exc()
    if is_rank_zero_process():
        err_console.print("[bold yellow]interrupted:[/] stopped by Ctrl-C", highlight=False)
    raise typer.Exit(TrainingInterrupted.exit_code)


def _option_for(f: Any) -> tuple[Any, Any]:
    """(annotation, typer.Option) for one Settings field; None as default = 'not given'."""
    kind = f.type
    if isinstance(kind, types.UnionType):  # `int | None`
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    name = f.name.replace("_", "-")
    choices = f.metadata["choices"]
    default = f.default
    if kind is bool:
        decls = [f"--{name}/--no-{name}"]
        shown: Any = name if default else f"no-{name}"
    else:
        decls = [f"--{name}"]
        shown = default if default is not None else "not set"
    if f.name.startswith("limit_"):
        kind = str  # Lightning's meaning: "10" is a count, "0.5" a fraction
    if choices:  # Typer shows and checks the allowed values of an Enum
        kind = enum.Enum(f.name, [(c, c) for c in choices], type=str)  # type: ignore[misc,no-redef]
    option = typer.Option(None, *decls, help=f.metadata["help"], show_default=str(shown))
    return Optional[kind], option


def _params(names: typing.Iterable[str]) -> list[inspect.Parameter]:
    by_name = {f.name: f for f in setting_fields()}
    params = []
    for name in names:
        annotation, option = _option_for(by_name[name])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def with_settings(names: typing.Iterable[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the named Settings fields as options; the command receives them as `settings` (given ones only)."""
    names = list(names)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)  # resolved, keeping Annotated options
        own = [
            p.replace(annotation=hints[p.name])
            for p in inspect.signature(fn).parameters.values()
            if p.name != "settings"
        ]

        def command(**kwargs: Any) -> Any:
            given = {k: getattr(v, "value", v) for k in names if (v := kwargs.get(k)) is not None}
            for k in names:
                kwargs.pop(k, None)
            return fn(settings=given, **kwargs)

        params = own + _params(names)
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        return command

    return decorate


def _version(value: bool) -> None:
    if value:
        console.print(f"fmnist-lightning {__version__}")
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

    Lightning sets its loggers to INFO when imported, so this must run after the import.
    """
    import lightning  # noqa: F401

    if not _debug:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # A torch/Lightning version mismatch warning that tells a user nothing actionable.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


OutOption = Annotated[
    Optional[Path], typer.Option("--out", help="Output folder. Default: the checkpoint's run folder.")
]
CkptOption = Annotated[Path, typer.Option("--ckpt", help="Checkpoint file, e.g. runs/001/checkpoints/best.ckpt.")]


def _settings(given: dict[str, Any]) -> Settings:
    return resolve_settings(None, given)


def _default_out_for(ckpt: Path) -> Path:
    """Reports go next to the run that produced the checkpoint (runs/001 for runs/001/checkpoints/best.ckpt)."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else ckpt.parent


# ---------------------------------------------------------------------------------------------
# Commands


@app.command()
@with_settings((*DATA, "val_size"))
def data(
    settings: dict[str, Any], out: Annotated[Path, typer.Option(help="Where to write samples.png.")] = Path("runs/data")
) -> None:
    """Analyse the data: split shapes, pixel range, images per class, and a grid of samples."""
    with user_errors():
        s = _settings(settings)
        from fmnist_lightning.data import CLASS_NAMES, FashionMNISTDataModule, first_of_each_class, summarize
        from fmnist_lightning.evaluation import check_output_dir
        from fmnist_lightning.plots import plot_image_grid

        check_output_dir(out)
        dm = FashionMNISTDataModule(data_dir=s.data_dir, offline=s.offline, val_size=s.val_size)
        dm.setup()
        summary = summarize(dm)
        table = Table(title=f"Fashion-MNIST ({dm.source})")
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
        for i, name in enumerate(CLASS_NAMES):
            counts.add_row(name, *(str(row.per_class[i]) for row in summary.values()))
        console.print(table)
        console.print(counts)
        images, labels = dm.split("train")
        first = first_of_each_class(labels)
        plot_image_grid(images[first], [CLASS_NAMES[labels[i]] for i in first], out / "samples.png")
        console.print(f"wrote {out / 'samples.png'}")


@app.command()
@with_settings(f.name for f in setting_fields())
def fit(
    settings: dict[str, Any],
    config: Annotated[Optional[Path], typer.Option(help="YAML file of settings (keys = option names).")] = None,
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
        from fmnist_lightning.training import fit_settings, run_fit

        s = fit_settings(config, settings, out, resume)
        result = run_fit(s, out=out, resume=resume, overwrite=overwrite)
        if result.is_global_zero:
            _print_fit_summary(result)
        if test:  # every rank: under DDP the test is distributed too
            _test(result.best_checkpoint, s, result.run_dir)


def _print_fit_summary(result: Any) -> None:
    table = Table(title=f"Run {result.run_dir}", show_header=False)
    table.add_row("best epoch", f"{result.best_epoch} of {result.epochs}")
    table.add_row("best val accuracy", f"{result.best_val_acc:.4f}")
    table.add_row("best checkpoint", str(result.best_checkpoint))
    table.add_row("wall time", f"{result.wall_time_s:.1f} s")
    table.add_row("training speed", f"{result.images_per_s:,.0f} images/s")
    table.add_row("peak memory (RSS)", f"{result.peak_rss_mb:,.0f} MB")
    console.print(table)


@app.command()
@with_settings((*HARDWARE, *DATA, *EVALUATION))
def test(settings: dict[str, Any], ckpt: CkptOption, out: OutOption = None) -> None:
    """Evaluate a checkpoint on the 10,000 test images: loss, accuracy, classification report."""
    with user_errors():
        s = _settings(settings)
        _test(ckpt, s, out or _default_out_for(ckpt))


def _test(ckpt: Path, s: Settings, out: Path) -> None:
    from fmnist_lightning.evaluation import check_output_dir, run_test

    check_output_dir(out)
    _, report = run_test(ckpt, s, out)
    if report is None:
        return
    _print_report(report)
    console.print(f"wrote {', '.join(str(out / name) for name in TEST_FILES)}")


def _print_report(report: dict[str, Any]) -> None:
    console.print(
        f"test loss {report['loss']:.4f}   test accuracy {report['accuracy']:.4f}   ({report['num_samples']} images)"
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
    from fmnist_lightning.data import CLASS_NAMES

    confusion = Table(title="Confusion matrix (rows: true class, columns: predicted)")
    confusion.add_column("")
    for i in range(len(CLASS_NAMES)):
        confusion.add_column(str(i), justify="right")
    for i, (name, row) in enumerate(zip(CLASS_NAMES, report["confusion_matrix"])):
        confusion.add_row(f"{i} {name}", *(str(v) for v in row))
    console.print(confusion)


@app.command("predict-samples")
@with_settings((*HARDWARE, *DATA, *EVALUATION))
def predict_samples(
    settings: dict[str, Any],
    ckpt: CkptOption,
    num: Annotated[int, typer.Option(help="How many correct and how many incorrect images to show (1-100).")] = 9,
    out: OutOption = None,
) -> None:
    """Show correctly and incorrectly classified test images (correct.png, incorrect.png)."""
    with user_errors():
        from fmnist_lightning.evaluation import check_output_dir, check_sample_count, evaluate_with, write_sample_grids

        check_sample_count(num)  # before the evaluation, so a bad --num fails at once
        s = _settings(settings)
        out = out or _default_out_for(ckpt)
        check_output_dir(out)
        results = evaluate_with(ckpt, s)
        if results.is_global_zero:
            _print_samples(write_sample_grids(results, num, out), num, out)


def _print_samples(picked: dict[str, list[int]], num: int, out: Path) -> None:
    for name, indices in picked.items():
        console.print(f"{name} ({len(indices)}): {indices}")
        if len(indices) < num:
            console.print(f"  only {len(indices)} {name} predictions exist")
    console.print(f"wrote {' and '.join(str(out / name) for name in SAMPLE_FILES)}")


@app.command()
@with_settings(f.name for f in setting_fields() if f.name != "dropout")
def compare(
    settings: dict[str, Any],
    config: Annotated[Optional[Path], typer.Option(help="YAML file of settings (keys = option names).")] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Folder for both runs. Default: a new numbered folder under runs/.")
    ] = None,
) -> None:
    """Train the same configuration with and without dropout, test both, and compare."""
    with user_errors():
        from fmnist_lightning.compare import run_compare

        rows = run_compare(resolve_settings(config, settings), out)
        if rows is None:
            return
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


@app.command()
@with_settings(("data_dir",))
def bench(
    settings: dict[str, Any],
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="32-true, bf16-mixed or 16-mixed (GPU).")] = "32-true",
    batch_size: Annotated[int, typer.Option(help="Training batch size (all paths).")] = 128,
    eval_batch_size: Annotated[int, typer.Option(help="Evaluation batch size (all paths but fmnist-fast).")] = 1000,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="channels_last memory format.")] = False,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the network (compile time is warm-up).")
    ] = False,
    steps: Annotated[Optional[int], typer.Option(help="Measured training steps per path.", show_default="400")] = None,
    epochs: Annotated[
        float, typer.Option(help="Measure this many 55k epochs instead of --steps (0: use --steps).")
    ] = 0,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Steps timed apart first.", show_default="20")] = None,
    paths: Annotated[str, typer.Option(help="Comma-separated: raw, fmnist, typical, fmnist-fast.")] = DEFAULT_PATHS,
    quick: Annotated[bool, typer.Option("--quick", help="Defaults of 40 steps after 5: well under 3 minutes.")] = False,
    repeats: Annotated[
        int,
        typer.Option(
            help="Rounds over all paths, each in a rotated order; speeds and ratios are reported as "
            "mean +- std over the rounds (ratios are taken within each round)."
        ),
    ] = 1,
    json_path: Annotated[
        Optional[Path], typer.Option("--json", help="Also write all results to this JSON file.")
    ] = None,
) -> None:
    """Benchmark training and evaluation speed: raw PyTorch vs fmnist vs a typical tutorial pipeline."""
    with user_errors():
        chosen = tuple(p.strip() for p in paths.split(",") if p.strip())
        from fmnist_lightning.bench import PATHS, BenchConfig, run_benchmark

        if not chosen:
            raise UsageError(f"--paths names no path; choose from {', '.join(PATHS)}")
        if unknown := [p for p in chosen if p not in PATHS]:
            raise UsageError(f"unknown benchmark path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
        if device not in ("cpu", "cuda") or precision not in ("32-true", "bf16-mixed", "16-mixed"):
            raise UsageError("--device must be cpu or cuda; --precision 32-true, bf16-mixed or 16-mixed")
        if json_path is not None:
            from fmnist_lightning.evaluation import check_output_dir

            check_output_dir(json_path.parent)
        warmup_steps = warmup_steps if warmup_steps is not None else (5 if quick else 20)
        steps = steps if steps is not None else (40 if quick else 400)
        if epochs:
            steps = round(epochs * 55000 / batch_size) - warmup_steps
        if min(batch_size, eval_batch_size, steps, repeats) < 1 or warmup_steps < 0 or epochs < 0:
            raise UsageError(
                "batch sizes, --steps and --repeats must be at least 1, --warmup-steps and --epochs at least 0"
            )
        cfg = BenchConfig(
            device=device,
            precision=precision,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            channels_last=channels_last,
            compile=compile,
            warmup_steps=warmup_steps,
            steps=steps,
            paths=chosen,
            data_dir=_settings(settings).data_dir,
            repeats=repeats,
        )
        result = run_benchmark(cfg, on_path=lambda p: err_console.print(f"[bold]benchmarking {p}...[/]"))
        _print_bench(result)
        if json_path:
            import json

            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2) + "\n")
            console.print(f"wrote {json_path}")


def _print_bench(result: dict[str, Any]) -> None:
    cfg, machine = result["config"], result["machine"]
    rounds = cfg["repeats"]
    title = (
        f"{cfg['device']} ({machine.get('gpu') or machine['cpu']}, {machine['cpu_threads']} threads), "
        f"{cfg['precision']}, batch {cfg['batch_size']}, {cfg['steps']} steps after {cfg['warmup_steps']} warm-up"
        f"{f', mean +- std of {rounds} rounds' if rounds > 1 else ''}; "
        f"torch {result['versions']['torch']}, lightning {result['versions']['lightning']}"
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

    for name, r in result["results"].items():
        cuda = r["cuda_max_allocated_mb"]
        table.add_row(
            name,
            spread(r["train_images_per_s"], r["train_images_per_s_std"]),
            f"{r['warmup_s']:.1f}",
            f"{r['epoch_s']:.1f}",
            spread(r["eval_images_per_s"], r["eval_images_per_s_std"]),
            str(r["eval_batch_size"]),
            r["settings"].get("eval_engine", "torch"),
            f"{r['peak_rss_mb']:,.0f}",
            "-" if cuda is None else f"{cuda:,.0f}",
        )
    console.print(table)
    for name, ratio in result["ratios"].items():
        if rounds > 1:
            per_round = ", ".join(f"{x:.2f}" for x in result["ratios_per_round"][name])
            console.print(
                f"{name}: {ratio:.2f}x +- {result['ratios_std'][name]:.2f}, median "
                f"{result['ratios_median'][name]:.2f}x (rounds: {per_round})"
            )
        else:
            console.print(f"{name}: {ratio:.2f}x")


@app.command()
@with_settings(("accelerator", "eval_batch_size"))
def predict(
    settings: dict[str, Any],
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
        s = _settings(settings)
        import json

        import torch

        from fmnist_lightning.evaluation import load_classifier
        from fmnist_lightning.inference import Prediction, image_paths, predict_images
        from fmnist_lightning.training import hardware_for

        device = torch.device("cuda" if hardware_for(s).on_gpu else "cpu")
        model = load_classifier(ckpt)
        paths, problems = image_paths(images)
        predictions = []
        for outcome in predict_images(model, paths, device, s.eval_batch_size, invert):
            if isinstance(outcome, Prediction):
                predictions.append(outcome)
            else:
                problems.append(outcome)
        for problem in problems:
            err_console.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
        if as_json:
            rows = [
                {"file": str(p.path), "top3": [{"class": c, "probability": round(v, 6)} for c, v in p.top(3)]}
                for p in predictions
            ]
            typer.echo(json.dumps(rows, indent=2))
        elif predictions:
            table = Table(title="Predictions (top 3 classes with probability)")
            for column in ("file", "1st", "2nd", "3rd"):
                table.add_column(column)
            for p in predictions:
                table.add_row(escape(str(p.path)), *(f"{c} {v:.4f}" for c, v in p.top(3)))
            console.print(table)
        if problems:
            raise typer.Exit(1)


@app.command()
@with_settings(DATA)
def export(
    settings: dict[str, Any],
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
        s = _settings(settings)
        from fmnist_lightning.data import FashionMNISTDataModule
        from fmnist_lightning.evaluation import load_classifier
        from fmnist_lightning.inference import (
            CHECK_IMAGES,
            EXPORT_EXTRA_HINT,
            EXPORT_FORMATS,
            EXPORT_TOLERANCE,
            export_model,
        )

        if fmt not in EXPORT_FORMATS:
            raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        path = out or _default_out_for(ckpt) / EXPORT_FORMATS[fmt]
        if path.is_dir():
            raise UsageError(f"--out {path} is a folder; give the file to write, e.g. {path / EXPORT_FORMATS[fmt]}")
        model = load_classifier(ckpt)
        test_images = FashionMNISTDataModule(s.data_dir, offline=s.offline).split("test")[0][:CHECK_IMAGES]
        result = export_model(model, fmt, path, test_images.unsqueeze(1).float() / 255.0)
        # ONNX tensors have names; a TorchScript module takes and returns plain tensors.
        input_name, output_name = (" 'images'", " 'logits'") if fmt == "onnx" else ("", "")
        console.print(f"wrote {escape(str(path))} ({fmt}, {path.stat().st_size / 1e6:.1f} MB)")
        console.print(f"  input{input_name}: float (batch, 1, 28, 28) in [0, 1], any batch size")
        console.print(f"  output{output_name}: float (batch, 10), the logits; softmax gives the class probabilities")
        if result.max_abs_diff is None:
            console.print(f"[yellow]not checked[/]: {result.runtime} is not installed ({escape(EXPORT_EXTRA_HINT)})")
        else:
            n = result.checked_images
            console.print(f"checked against PyTorch with {result.runtime} on {n} test images (batches of 1 and {n}):")
            console.print(f"  max |logit difference| {result.max_abs_diff:.2e} (tolerance {EXPORT_TOLERANCE:g})")


@app.command()
@with_settings((*HARDWARE, *DATA, *EVALUATION))
def report(
    settings: dict[str, Any],
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder, e.g. runs/001.", show_default=False)],
) -> None:
    """Write RUN_DIR/report.html: settings, learning curves, test report, confusion matrix, sample images.

    Runs `test` and `predict-samples` first when their files are missing or older than the checkpoint.
    """
    with user_errors():
        if not run_dir.is_dir():
            raise UsageError(f"run folder {run_dir} does not exist or is not a folder")
        from fmnist_lightning.evaluation import (
            classification_report,
            evaluate_with,
            write_sample_grids,
            write_test_outputs,
        )
        from fmnist_lightning.html_report import TEST_INPUTS, needs_update, write_report

        ckpt = run_dir / BEST_CHECKPOINT
        stale_test = ckpt.is_file() and needs_update(run_dir, TEST_INPUTS, ckpt)
        stale_samples = ckpt.is_file() and needs_update(run_dir, SAMPLE_FILES, ckpt)
        is_global_zero = True
        if stale_test or stale_samples:  # one pass over the test set serves both
            s = _settings(settings)
            results = evaluate_with(ckpt, s)
            is_global_zero = results.is_global_zero
            if is_global_zero and stale_test:
                report = classification_report(results)
                write_test_outputs(results, report, run_dir)
                _print_report(report)
            if is_global_zero and stale_samples:
                _print_samples(write_sample_grids(results, 9, run_dir), 9, run_dir)
        if is_global_zero:
            console.print(f"wrote {write_report(run_dir)}")


def main(args: list[str] | None = None) -> None:
    """Entry point: command-line usage errors also become one line (exit 2) instead of a panel."""
    try:
        result = app(args=args, standalone_mode=False, prog_name="fmnist")
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        # Typer's (click's) usage errors carry `format_message` and `exit_code`; anything else is a bug.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else 0)
