"""The Keras anchor: the tutorial CNN in Keras 3 (TensorFlow), trained and evaluated as `fmnist fit`
and `fmnist test` do by default, timed the way a Keras user would time it.

    .nox/anchor/bin/python scripts/keras_anchor.py --precision mixed_bfloat16 --epochs 3 --json keras.json

It runs in its own environment (`nox -s anchor` builds .nox/anchor: tensorflow-cpu and keras), never
in the tool's: it imports neither torch nor fmnist_lightning, and reads the IDX files itself.

What is the same as the tool's defaults: the network (3x3 SAME conv 32/64/128 + ReLU + 2x2 SAME
max-pool, dropout 0.25 after each block; dense 128 + ReLU, dropout 0.3; 10 logits; Glorot-uniform
weights, zero biases: 356,234 parameters), the data (the official files; validation = the first 5,000
training images, training = the other 55,000, test = the official 10,000; pixels / 255), Adam at
1e-3 with a per-step cosine decay to 0, batch 128, shuffled every epoch, a validation pass after each
epoch. What is Keras's own: its defaults (Adam's epsilon, no XLA on a CPU), sparse labels, and under
mixed_bfloat16 the logits cast to float32 as Keras's mixed-precision guide says.

What it reports (each training figure excludes the validation pass):
- step img/s: steady state, from the start of step `--skip-steps` + 1 of each epoch to the end of its
  last step (timed by a callback at on_train_batch_begin/end), all epochs together;
- epoch img/s: what `model.fit` gives per epoch, from the epoch's start to the end of its last step;
- evaluation img/s: `model.evaluate` on the 10,000 test images at each of `--eval-batch-sizes`, after
  one untimed call (its tracing), the median of `--eval-repeats` calls; the best batch size counts;
- test accuracy (the first timed evaluation's).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 55000, 5000, 10000
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The tutorial CNN in Keras 3: training and evaluation speed.")
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16"), default="float32")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-steps", type=int, default=0, help="Train only this many steps per epoch (0: all).")
    parser.add_argument(
        "--skip-steps", type=int, default=10, help="Steps at each epoch's start left out of step img/s."
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--eval-batch-sizes",
        default="128,250,1000",
        help="Comma list: evaluation batch sizes to try (the best counts).",
    )
    parser.add_argument("--eval-repeats", type=int, default=3, help="Timed evaluations per batch size (the median).")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra- and inter-op threads (0: all cores).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="Folder with the IDX files (else Debian's)."
    )
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    steps = args.limit_steps or -(-TRAIN_SIZE // args.batch_size)
    if min(args.epochs, args.batch_size, args.eval_repeats) < 1 or args.limit_steps < 0 or args.threads < 0:
        parser.error("--epochs, --batch-size and --eval-repeats must be at least 1; --limit-steps, --threads >= 0")
    if not 0 <= args.skip_steps < steps:
        parser.error(f"--skip-steps must leave steps to time: 0 <= {args.skip_steps} < {steps} steps per epoch")
    args.eval_batch_sizes = [int(b) for b in args.eval_batch_sizes.split(",")]
    return args


# ----------------------------------------------------------------------------------------------
# The data, read as fmnist_lightning.sources reads it (same places, either layout, .gz or not).


def find_idx(name: str, data_dir: Path) -> Path:
    for folder in (data_dir, data_dir / "FashionMNIST" / "raw", SYSTEM_DATA_DIR):
        for path in (folder / name, folder / f"{name}.gz"):
            if path.is_file():
                return path
    sys.exit(f"error: {name} not found in {data_dir} or {SYSTEM_DATA_DIR}; install Debian's dataset-fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file as a uint8 array of the shape in its header."""
    content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if content[:3] != b"\x00\x00\x08":
        sys.exit(f"error: {path} is not an unsigned-byte IDX file")
    ndim = content[3]
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_splits(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / val / test as (float32 NHWC images in [0, 1], int64 labels): the tool's split."""
    raw = {key: read_idx(find_idx(name, data_dir)) for key, name in IDX_NAMES.items()}

    def images(pixels: np.ndarray) -> np.ndarray:
        return (pixels.astype(np.float32) / 255.0)[..., None]

    train_x, train_y = images(raw["train_images"]), raw["train_labels"].astype(np.int64)
    return {
        "train": (train_x[VAL_SIZE:], train_y[VAL_SIZE:]),
        "val": (train_x[:VAL_SIZE], train_y[:VAL_SIZE]),
        "test": (images(raw["test_images"]), raw["test_labels"].astype(np.int64)),
    }


# ----------------------------------------------------------------------------------------------


def build_model(keras: Any, lr_schedule: Any) -> Any:
    layers = keras.layers
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)  # glorot_uniform, zero bias
        x = layers.MaxPooling2D(2, padding="same")(x)  # 28 -> 14 -> 7 -> 4
        x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(10)(x)
    outputs = layers.Activation("linear", dtype="float32")(x)  # float32 logits under mixed precision
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr_schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def step_timer(keras: Any, skip: int, batch_size: int, train_size: int) -> Any:
    """A callback that times each epoch's training steps (the validation pass after them is left out)."""

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[dict[str, float]] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()
            self.steady_start = self.last_end = self.start
            self.images = self.steady_images = 0

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if batch == skip:
                self.steady_start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            # On TensorFlow, Keras calls back synchronously with the step's logs already turned into
            # Python numbers: the step's work is done by now.
            self.last_end = time.perf_counter()
            images = min(batch_size, train_size - batch * batch_size)
            self.images += images
            if batch >= skip:
                self.steady_images += images

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.epochs.append(
                {
                    "epoch": epoch + 1,
                    "train_time_s": self.last_end - self.start,
                    "images": self.images,
                    "steady_time_s": self.last_end - self.steady_start,
                    "steady_images": self.steady_images,
                }
            )

    return StepTimer()


def evaluation_speeds(model: Any, test: tuple[np.ndarray, np.ndarray], batch_sizes: list[int], repeats: int) -> dict:
    """model.evaluate on the test set per batch size: the untimed first call (tracing) and the median timed one."""
    x, y = test
    by_batch: dict[int, dict[str, float]] = {}
    for batch_size in batch_sizes:
        start = time.perf_counter()
        model.evaluate(x, y, batch_size=batch_size, verbose=0)
        first = time.perf_counter() - start
        times, results = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            results.append(model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True))
            times.append(time.perf_counter() - start)
        by_batch[batch_size] = {
            "images_per_s": len(x) / statistics.median(times),
            "first_call_s": first,
            "accuracy": float(results[0]["accuracy"]),
            "loss": float(results[0]["loss"]),
        }
    best = max(by_batch, key=lambda b: by_batch[b]["images_per_s"])
    return {"best_batch_size": best, "images_per_s": by_batch[best]["images_per_s"], "by_batch_size": by_batch}


def cpu_info() -> dict[str, Any]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return {
        "name": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    splits = load_splits(args.data_dir)
    import keras
    import tensorflow as tf

    threads = args.threads or os.cpu_count() or 1
    tf.config.threading.set_intra_op_parallelism_threads(threads)  # before TensorFlow runs anything
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(args.precision)
    steps = args.limit_steps or -(-TRAIN_SIZE // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=steps * args.epochs)
    model = build_model(keras, schedule)
    timer = step_timer(keras, args.skip_steps, args.batch_size, TRAIN_SIZE)
    (train_x, train_y), val = splits["train"], splits["val"]
    start = time.perf_counter()
    model.fit(
        train_x,
        train_y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.limit_steps or None,
        validation_data=val,
        validation_steps=args.limit_steps or None,
        shuffle=True,
        callbacks=[timer],
        verbose=0,
    )
    fit_wall = time.perf_counter() - start
    evaluation = evaluation_speeds(model, splits["test"], args.eval_batch_sizes, args.eval_repeats)
    epochs = timer.epochs
    best = evaluation["by_batch_size"][evaluation["best_batch_size"]]
    return {
        "framework": "keras",
        "precision": args.precision,
        "versions": {
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "backend": keras.backend.backend(),
            "python": platform.python_version(),
        },
        "cpu": cpu_info(),
        "threads": {"intra_op": threads, "inter_op": threads},
        "settings": {
            key: getattr(args, key)
            for key in ("epochs", "limit_steps", "skip_steps", "batch_size", "lr", "eval_batch_sizes", "eval_repeats")
        }
        | {"seed": args.seed, "jit_compile": bool(model.jit_compile), "parameters": model.count_params()},
        "train": {
            "step_images_per_s": sum(e["steady_images"] for e in epochs) / sum(e["steady_time_s"] for e in epochs),
            "epoch_images_per_s": sum(e["images"] for e in epochs) / sum(e["train_time_s"] for e in epochs),
            "fit_wall_s": fit_wall,
            "epochs": epochs,
        },
        "eval": evaluation,
        "test_accuracy": best["accuracy"],
        "test_loss": best["loss"],
    }


def print_table(result: dict[str, Any]) -> None:
    v, cpu, train, evaluation = result["versions"], result["cpu"], result["train"], result["eval"]
    print(f"Keras {v['keras']} / TensorFlow {v['tensorflow']}, {result['precision']}, {cpu['name']}")
    print(f"  avx512_bf16: {cpu['avx512_bf16']}, threads: {result['threads']['intra_op']}")
    rows = [
        ("training img/s per step (steady state)", f"{train['step_images_per_s']:,.0f}"),
        ("model.fit img/s per epoch", f"{train['epoch_images_per_s']:,.0f}"),
        (f"evaluation img/s (batch {evaluation['best_batch_size']})", f"{evaluation['images_per_s']:,.0f}"),
        ("test accuracy", f"{result['test_accuracy']:.4f}"),
    ]
    for label, value in rows:
        print(f"  {label:<42} {value:>10}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notes are not results
    result = run(args)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
