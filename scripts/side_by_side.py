"""The side by side: `fmnist fit` and `fmnist test` against the Keras anchor, alternating, in rounds.

    python scripts/side_by_side.py --rounds 3 --epochs 3 --json side-by-side.json

Run it with the tool's Python (the one `fmnist` runs in). The anchor runs in its own environment:
--anchor-python, default $FMNIST_ANCHOR_PYTHON or .nox/anchor/bin/python (`nox -s anchor
--install-only` builds it). Each round measures each precision (32-true against Keras's float32,
bf16-mixed against mixed_bfloat16) with both frameworks, one after the other in a fresh process
each, fmnist first in odd rounds and Keras first in even ones:

- fmnist: `fmnist fit --precision P --max-epochs E`, then `fmnist test --precision P` on its best
  checkpoint, both run by scripts/timed_fmnist.py (the commands as they are, with a step timer);
- Keras: scripts/keras_anchor.py at the same precision and epochs (the same network, data, batch,
  optimiser and schedule; see its docstring).

The figures, none of which counts validation:
- training, per step: the steady state of each epoch after --skip-steps steps, timed the same way
  on both sides (from the start of the first counted step to the end of the epoch's last);
- training, per epoch: training images over training time, all epochs: fmnist's from its own
  metrics.csv (train_time_s, images_per_s), Keras's from each model.fit epoch;
- evaluation: `fmnist test`'s pass over the 10,000 test images, against Keras's model.evaluate at
  its best batch size (warm: tracing is left out).
Each ratio is fmnist / Keras within a round; the table gives their median and every round's. The
last line is issue 29's evaluation target: `fmnist test` at the precision `auto` picks on this
CPU, against Keras's best evaluation over the precisions of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fmnist_lightning.hardware import auto_precision, cpu_bf16_flag, cpu_name
from fmnist_lightning.runs import CONFIG, METRICS, TEST_REPORT, read_metrics
from fmnist_lightning.settings import read_config

ROOT = Path(__file__).resolve().parent.parent
KERAS_PRECISION = {"32-true": "float32", "bf16-mixed": "mixed_bfloat16"}
FIGURES = {"step": "training, per step", "epoch": "training, per epoch", "eval": "evaluation"}


def default_anchor_python() -> Path:
    """$FMNIST_ANCHOR_PYTHON, else the Python of the environment `nox -s anchor` builds."""
    return Path(os.environ.get("FMNIST_ANCHOR_PYTHON", ROOT / ".nox" / "anchor" / "bin" / "python"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fmnist fit/test against the Keras anchor, alternating, in rounds.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precisions", default="32-true,bf16-mixed", help="Comma list of 32-true, bf16-mixed.")
    parser.add_argument("--skip-steps", type=int, default=10, help="Steps at each epoch's start left out of per step.")
    parser.add_argument(
        "--limit-steps", type=int, default=0, help="A quick check: train and validate this many steps per epoch."
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="Folder with the IDX files (else Debian's)."
    )
    parser.add_argument(
        "--anchor-python",
        type=Path,
        default=default_anchor_python(),
        help="The Python of the anchor's environment (default: $FMNIST_ANCHOR_PYTHON or .nox/anchor/bin/python).",
    )
    parser.add_argument("--anchor-args", default="", help="More options for keras_anchor.py, e.g. '--threads 2'.")
    parser.add_argument("--fit-args", default="", help="More options for `fmnist fit`, e.g. '--no-progress'.")
    parser.add_argument("--workdir", type=Path, help="Keep every run's files here (default: a temporary folder).")
    parser.add_argument("--json", type=Path, help="Also write every figure to this JSON file.")
    args = parser.parse_args(argv)
    args.precisions = args.precisions.split(",")
    if unknown := [p for p in args.precisions if p not in KERAS_PRECISION]:
        parser.error(f"--precisions takes 32-true and bf16-mixed, not {', '.join(unknown)}")
    if min(args.rounds, args.epochs) < 1 or args.skip_steps < 0 or args.limit_steps < 0:
        parser.error("--rounds and --epochs must be at least 1; --skip-steps and --limit-steps at least 0")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty; give a new or empty folder")
    if not args.anchor_python.is_file():
        parser.error(
            f"the anchor's Python {args.anchor_python} does not exist: build its environment with "
            "`nox -s anchor --install-only`, or give --anchor-python"
        )
    return args


def run_logged(command: list[Any], log: Path) -> None:
    """Run `command`, its output into `log`; a failure ends this script with the log's last lines."""
    words = [str(word) for word in command]
    with log.open("w") as out:
        code = subprocess.run(words, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        sys.exit(f"{tail}\nerror: {' '.join(words[:4])} ... failed (exit {code}); its output is in {log}")


def run_fmnist(args: argparse.Namespace, precision: str, folder: Path) -> dict[str, Any]:
    run, test = folder / "fmnist-run", folder / "fmnist-test"
    timed = [sys.executable, ROOT / "scripts" / "timed_fmnist.py", "--skip-steps", args.skip_steps, "--timing"]
    common = ["--precision", precision, "--accelerator", "cpu", "--offline", "--data-dir", args.data_dir]
    limits = (
        ["--limit-train-batches", args.limit_steps, "--limit-val-batches", args.limit_steps] if args.limit_steps else []
    )
    fit = ["fit", "--max-epochs", args.epochs, "--out", run, *common, *limits, *args.fit_args.split()]
    run_logged([*timed, folder / "fmnist-fit-timing.json", *fit], folder / "fmnist-fit.log")
    best = run / "checkpoints" / "best.ckpt"
    run_logged(
        [*timed, folder / "fmnist-test-timing.json", "test", "--ckpt", best, "--out", test, *common],
        folder / "fmnist-test.log",
    )

    steps = json.loads((folder / "fmnist-fit-timing.json").read_text())["train_epochs"]
    (evaluation,) = json.loads((folder / "fmnist-test-timing.json").read_text())["tests"]
    epochs = read_metrics(run / METRICS)  # the tool's own per-epoch figures
    return {
        "step_images_per_s": sum(e["steady_images"] for e in steps) / sum(e["steady_time_s"] for e in steps),
        "epoch_images_per_s": sum(e["images_per_s"] * e["train_time_s"] for e in epochs)
        / sum(e["train_time_s"] for e in epochs),
        "eval_images_per_s": evaluation["images"] / evaluation["time_s"],
        "test_accuracy": json.loads((test / TEST_REPORT).read_text())["accuracy"],
        "steps": steps,
        "epochs": epochs,
        "provenance": read_config(run / CONFIG)[1],
    }


def run_keras(args: argparse.Namespace, precision: str, folder: Path) -> dict[str, Any]:
    out = folder / "keras.json"
    anchor = [args.anchor_python, ROOT / "scripts" / "keras_anchor.py", "--precision", KERAS_PRECISION[precision]]
    options = ["--epochs", args.epochs, "--skip-steps", args.skip_steps, "--limit-steps", args.limit_steps]
    run_logged(
        [*anchor, *options, "--data-dir", args.data_dir, "--json", out, *args.anchor_args.split()], folder / "keras.log"
    )
    result = json.loads(out.read_text())
    return {
        "step_images_per_s": result["train"]["step_images_per_s"],
        "epoch_images_per_s": result["train"]["epoch_images_per_s"],
        "eval_images_per_s": result["eval"]["images_per_s"],
        "test_accuracy": result["test_accuracy"],
        "anchor": result,
    }


def run_rounds(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    frameworks = (("fmnist", run_fmnist), ("keras", run_keras))
    rounds = []
    for number in range(1, args.rounds + 1):
        for precision in args.precisions:
            folder = workdir / f"round{number}-{precision}"
            folder.mkdir(parents=True)
            order = frameworks if number % 2 else frameworks[::-1]
            measured = {name: run(args, precision, folder) for name, run in order}
            ratios = {
                figure: measured["fmnist"][f"{figure}_images_per_s"] / measured["keras"][f"{figure}_images_per_s"]
                for figure in FIGURES
            }
            rounds.append({"round": number, "precision": precision, "order": [n for n, _ in order], **measured})
            rounds[-1]["ratios"] = ratios
            said = ", ".join(f"{figure} {ratio:.2f}x" for figure, ratio in ratios.items())
            print(f"round {number}, {precision}: fmnist / Keras: {said}", file=sys.stderr, flush=True)
    return rounds


def evaluation_target(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per round: `fmnist test` at auto's precision over Keras's best evaluation in that round."""
    auto = auto_precision(on_gpu=False)[0]
    per_round = []
    for number in sorted({r["round"] for r in rounds}):
        same = [r for r in rounds if r["round"] == number]
        ours = [r["fmnist"]["eval_images_per_s"] for r in same if r["precision"] == auto]
        if not ours:
            return None  # auto's precision was not measured
        per_round.append(ours[0] / max(r["keras"]["eval_images_per_s"] for r in same))
    return {"auto_precision": auto, "median": statistics.median(per_round), "per_round": per_round}


def summarise(rounds: list[dict[str, Any]], precisions: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for precision in precisions:
        mine = [r for r in rounds if r["precision"] == precision]
        summary[precision] = {
            figure: {
                "fmnist_images_per_s": statistics.median(r["fmnist"][f"{figure}_images_per_s"] for r in mine),
                "keras_images_per_s": statistics.median(r["keras"][f"{figure}_images_per_s"] for r in mine),
                "ratio_median": statistics.median(r["ratios"][figure] for r in mine),
                "ratio_per_round": [r["ratios"][figure] for r in mine],
            }
            for figure in FIGURES
        } | {
            "test_accuracy": {side: [r[side]["test_accuracy"] for r in mine] for side in ("fmnist", "keras")},
        }
    return summary


def environment(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    fmnist, keras = rounds[0]["fmnist"]["provenance"], rounds[0]["keras"]["anchor"]
    return {
        "cpu": cpu_name(),
        "cpu_bf16": cpu_bf16_flag(),
        "cores": os.cpu_count(),
        "commit": fmnist.get("git_commit"),
        "versions": {key: fmnist.get(key) for key in ("fmnist_lightning", "torch", "lightning", "python")}
        | {key: keras["versions"][key] for key in ("keras", "tensorflow")},
        "keras_threads": keras["threads"],
    }


def print_table(result: dict[str, Any]) -> None:
    env, v = result["environment"], result["environment"]["versions"]
    print(
        f"Side by side on {env['cpu']} ({env['cpu_bf16'] or 'no native bf16'}, {env['cores']} cores), commit "
        f"{(env['commit'] or 'unknown')[:7]}: fmnist {v['fmnist_lightning']} (torch {v['torch']}, Lightning "
        f"{v['lightning']}) / Keras {v['keras']} (TensorFlow {v['tensorflow']})"
    )
    print(f"{'precision':<11} {'figure':<20} {'fmnist img/s':>12} {'Keras img/s':>12} {'ratio':>7}  per round")
    for precision, figures in result["summary"].items():
        for figure, label in FIGURES.items():
            f = figures[figure]
            rounds = " ".join(f"{ratio:.2f}x" for ratio in f["ratio_per_round"])
            print(
                f"{precision:<11} {label:<20} {f['fmnist_images_per_s']:>12,.0f} {f['keras_images_per_s']:>12,.0f} "
                f"{f['ratio_median']:>6.2f}x  {rounds}"
            )
        accuracy = figures["test_accuracy"]
        print(f"{'':<11} test accuracy: fmnist {accuracy['fmnist']}, Keras {accuracy['keras']}")
    if target := result["evaluation_target"]:
        rounds = " ".join(f"{ratio:.2f}x" for ratio in target["per_round"])
        print(
            f"evaluation target: fmnist test at {target['auto_precision']} (auto) / Keras's best: "
            f"{target['median']:.2f}x (per round: {rounds})"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as scratch:
        workdir = args.workdir or Path(scratch)
        rounds = run_rounds(args, workdir)
    result = {
        "environment": environment(rounds),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summarise(rounds, args.precisions),
        "evaluation_target": evaluation_target(rounds),
        "rounds": rounds,
    }
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
