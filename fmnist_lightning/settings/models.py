"""The settings of every command: small pydantic models in sections, composed into `Settings`.

Settings flow one way: CLI options and YAML keys -> `Settings` -> the library. Each field carries
its type, its constraints and its help text; the CLI builds its options from these fields, so a
new setting is one line here and appears everywhere (YAML, CLI, `config.yaml` of every run), and
is validated in one place. Defaults live here only: the library classes take the values they are
given. `files.py` layers the defaults, a YAML file and the options given, and words the errors.

The fields are grouped in sections (`ModelSettings`, `OptimisationSettings`, `DataSettings`, ...),
and each consumer takes only the sections it reads: the data module the data and augmentation
sections, the LightningModule the model and optimisation sections, `resolve_hardware` the hardware
section. A consumer takes a section's fields by their names (`sections.arguments_for`, or the whole
section as keyword arguments), never from a list of them written again; `tests/test_settings_reach.py`
checks that every field reaches a consumer. The sections are a code structure only: YAML keys,
options and `config.yaml` stay flat (`lr: 0.001`, `--lr`), because `Sectioned` (sections.py) builds
itself from, and dumps itself to, one flat mapping. `BenchConfig` is flat: the benchmark's own few settings.

Validation is strict (a YAML `max_epochs: "5"` or `dropout: 1` is refused, not guessed at), with
one exception: numbers written as text, because YAML 1.1 reads `1e-3` (no dot) as a string and the
CLI passes `--limit-*` as text ("10" is a count of batches, "0.5" a fraction, as in Lightning).
A validator raises a PydanticCustomError worded as pydantic words its own rules ("Input should be
..."): the error a user reads is the key, pydantic's message and the value (files.py).

This module imports neither torch nor lightning: `fmnist --help` must stay fast.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fmnist_lightning.settings.sections import FlatModel, Number, Section, Sectioned, comma_list, number_from_text

MAX_SEED = 2**32 - 1


Rate = Annotated[float, Number, Field(ge=0, lt=1)]
# Lightning's meaning: an int is a count of batches, a float a fraction of them.
BatchLimit = Annotated[int | float, Number]


Logger = Literal["csv", "tensorboard", "mlflow"]
Precision = Literal["auto", "32-true", "16-mixed", "bf16-mixed"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda"]


class ModelSettings(Section):
    """The network and how it runs: architecture, dropout, input standardisation, memory layout, compilation."""

    network: Literal["convnet", "convnet-bn", "resnet"] = Field("convnet", description="Network architecture.")
    dropout: bool = Field(True, description="Use dropout (the tutorial's fix for overfitting).")
    dropout_conv: Rate = Field(0.25, description="Dropout rate after each conv/pool block.")
    dropout_dense: Rate = Field(0.3, description="Dropout rate after the dense layer.")
    standardize: bool = Field(False, description="Standardise images with the train split's mean and std.")
    channels_last: bool = Field(True, description="channels_last memory layout: faster convolutions, same arithmetic.")
    compile: bool = Field(False, description="Compile the network with torch.compile.")


class OptimisationSettings(Section):
    """The optimiser, its learning-rate schedule and batch size.

    Defaults are the tutorial's: Adam, lr 1e-3, batch 128."""

    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimiser.")
    lr: Annotated[float, Number] = Field(
        1e-3, gt=0, allow_inf_nan=False, description="Learning rate (peak rate with --lr-schedule onecycle)."
    )
    weight_decay: Annotated[float, Number] = Field(
        0.0, ge=0, allow_inf_nan=False, description="Weight decay (decoupled for adamw)."
    )
    lr_schedule: Literal["none", "cosine", "onecycle"] = Field(
        "cosine", description="Learning-rate schedule over all steps."
    )
    batch_size: int = Field(
        128,
        gt=0,
        description="Images per optimiser step on each device. Under DDP the effective batch is "
        "batch_size x devices x nodes; the learning rate is not rescaled for you.",
    )


class DataSettings(Section):
    """Where the Fashion-MNIST files come from, and the validation split."""

    data_dir: str = Field("data", description="Folder with the Fashion-MNIST IDX files (or where to download them).")
    offline: bool = Field(False, description="Never download: use --data-dir or the system copy only.")
    val_size: int = Field(
        5000, ge=1, le=59999, description="Validation images: the first N of the official training file."
    )


class AugmentationSettings(Section):
    """What training batches are made of: augmentation on the device, and soft targets."""

    augment: bool = Field(False, description="On-device augmentation: random translate +-2 px and horizontal flip.")
    random_erasing: Annotated[float, Number] = Field(
        0.0, ge=0, le=1, description="Probability of random erasing per training image."
    )
    label_smoothing: Rate = Field(0.0, description="Label smoothing applied to the one-hot targets.")


class HardwareSettings(Section):
    """Which devices, how many processes, and the numeric precision."""

    gpus: int | None = Field(None, ge=0, description="Shortcut: 0 = CPU, N = N GPUs (N > 1 uses DDP).")
    accelerator: Accelerator = Field("auto", description="Lightning accelerator.")
    devices: Annotated[str, BeforeValidator(lambda v: str(v) if type(v) is int else v)] = Field(
        "auto", description="Devices per node: a count, 'auto', or a list like '0,1'."
    )
    strategy: Literal["auto", "ddp", "ddp_spawn"] = Field(
        "auto", description="Distribution strategy (ddp for several devices)."
    )
    num_nodes: int = Field(
        1, ge=1, description="Number of machines (torchrun or SLURM launches one process per device)."
    )
    precision: Precision = Field(
        "auto",
        description="Numeric precision. auto: bf16-mixed on GPUs that do bf16 natively, 16-mixed on other GPUs; "
        "bf16-mixed on a CPU with native bf16 (avx512_bf16 or amx_bf16), else 32-true (the fit summary and "
        "config.yaml say what was picked and why).",
    )

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",")]
        ids = [p for p in parts if p]
        single = len(parts) == 1 and value.strip().isdigit() and int(value) >= 1
        listed = len(parts) > 1 and bool(ids) and all(p.isdigit() for p in ids)
        if value != "auto" and not (single or listed):
            raise PydanticCustomError("devices", "Input should be 'auto', a count >= 1 or a list like '0,1'")
        return value


class EvaluationSettings(Section):
    """How validation and test run: batch size, engine, test-time augmentation."""

    eval_batch_size: int = Field(
        250, gt=0, description="Batch size for validation and test (250 keeps a CPU's caches warm)."
    )
    eval_engine: Literal["torch", "onnxruntime"] = Field(
        "torch",
        description="What runs the network at test time: torch, or onnxruntime (CPU, fp32; faster on CPUs, the same "
        "predictions up to float rounding; needs the 'export' extra).",
    )
    tta: bool = Field(
        False,
        description="Test-time augmentation: average each test image's prediction with its horizontal mirror's "
        "(the mirror image is one of training's augmentations; evaluation takes twice as long).",
    )


class RunSettings(Section):
    """How long and how reproducibly to train, what to check and save along the way."""

    max_epochs: int = Field(12, ge=1, description="Number of training epochs.")
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Random seed for weights, data order, dropout and augmentation."
    )
    deterministic: bool = Field(False, description="Use deterministic algorithms (bit-identical CPU reruns).")
    progress: bool = Field(True, description="Show a progress bar.")
    checkpoint_every_n_steps: int = Field(
        200,
        ge=0,
        description="Also save checkpoints/last.ckpt every N optimiser steps (0: at epoch ends only), so a "
        "killed process loses at most N steps; a restarted torchrun or requeued SLURM job resumes from it.",
    )
    limit_train_batches: BatchLimit = Field(
        1.0, description="Lightning's meaning: a fraction (0.5) or a count (10) of batches."
    )
    limit_val_batches: BatchLimit = Field(
        1.0, description="Lightning's meaning: a fraction (0.5) or a count (10) of batches."
    )
    val_check_interval: BatchLimit = Field(
        1.0, description="Validate every this fraction of an epoch (0.5) or number of training batches (100)."
    )
    check_val_every_n_epoch: int = Field(1, ge=1, description="Validate after every N-th epoch only.")
    fast_dev_run: bool = Field(
        False, description="Smoke test: one batch of each split, no files kept (no run folder is left behind)."
    )
    overfit_batches: BatchLimit = Field(
        0.0,
        description="Sanity check: train on the same N batches every epoch, validate on N (a count, or a fraction; "
        "0: off).",
    )
    profiler: Literal["none", "simple", "advanced", "pytorch"] = Field(
        "none", description="Lightning profiler; its report goes into the run folder."
    )

    @field_validator("limit_train_batches", "limit_val_batches", "val_check_interval")
    @classmethod
    def _batch_limit(cls, value: int | float) -> int | float:
        if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not (0 < value <= 1)):
            raise PydanticCustomError("batch_limit", "Input should be a fraction in (0, 1] or a count >= 1")
        return value

    @field_validator("overfit_batches")
    @classmethod
    def _overfit(cls, value: int | float) -> int | float:
        if value < 0 or (isinstance(value, float) and value > 1):
            raise PydanticCustomError(
                "overfit_batches", "Input should be 0 (off), a fraction in (0, 1] or a count >= 1"
            )
        return value


class ToolkitSettings(Section):
    """Training tricks, each a Lightning callback or Trainer argument: early stopping, gradient
    clipping and accumulation, weight averaging."""

    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many validations without improvement (0: off). best.ckpt stays the best."
    )
    early_stopping_monitor: Literal["val/acc", "val/loss"] = Field(
        "val/acc", description="Metric early stopping watches (val/acc must rise, val/loss must fall)."
    )
    early_stopping_min_delta: Annotated[float, Number] = Field(
        0.0, ge=0, allow_inf_nan=False, description="Smallest change of the monitored metric that counts as better."
    )
    stop_at_val_acc: Annotated[float, Number] = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Stop once validation accuracy reaches this, e.g. 0.94 (0: off); the summary gives the "
        "training time to it.",
    )
    gradient_clip_val: Annotated[float, Number] = Field(
        0.0, ge=0, allow_inf_nan=False, description="Clip gradients at this value (0: off)."
    )
    gradient_clip_algorithm: Literal["norm", "value"] = Field(
        "norm", description="norm: rescale the total gradient norm; value: clamp each gradient element."
    )
    accumulate_grad_batches: int = Field(
        1, ge=1, description="Sum the gradients of N batches per optimiser step (effective batch x N)."
    )
    weight_averaging: Literal["none", "ema", "swa"] = Field(
        "none",
        description="Validate, checkpoint and use averaged weights: ema (exponential moving average) or swa "
        "(equal average from --swa-start on).",
    )
    ema_decay: Annotated[float, Number] = Field(
        0.999, gt=0, lt=1, description="EMA: weight of the previous average at each optimiser step."
    )
    swa_start: Annotated[float, Number] = Field(
        0.75, ge=0, lt=1, description="SWA: fraction of the training steps after which weights are averaged."
    )


class TrackingSettings(Section):
    """Where metrics go besides metrics.csv (which is always written)."""

    logger: Annotated[tuple[Logger, ...], BeforeValidator(comma_list)] = Field(
        ("tensorboard",),
        min_length=1,
        description="Where metrics also go: csv (metrics.csv only), tensorboard (when installed), mlflow (needs "
        "the 'tracking' extra). Repeat the option or give a comma list.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI, e.g. a server's http://host:5000. Default: sqlite mlflow.db in the run "
        "folder's parent, artifacts in mlartifacts/ beside it.",
    )
    experiment: str = Field("fmnist", min_length=1, description="MLflow experiment name.")


class ServeSettings(Section):
    """How `fmnist serve` listens, batches and guards the model."""

    host: Literal["127.0.0.1", "0.0.0.0", "::"] = Field(
        "127.0.0.1", description="Address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 or :: (all)."
    )
    port: int = Field(8000, ge=1024, le=65535, description="Port to listen on.")
    engine: Literal["torch", "onnxruntime"] = Field(
        "torch", description="What runs the network: torch, or onnxruntime (CPU; needs the 'export' extra)."
    )
    workers: int = Field(
        1, ge=1, le=64, description="Inference worker processes: each loads the model and runs batches."
    )
    api_servers: int = Field(
        1, ge=1, le=64, description="HTTP processes: each receives requests, checks the key and decodes images."
    )
    max_batch_size: int = Field(
        16, ge=1, le=1024, description="Batch up to this many concurrent requests (1: no batching)."
    )
    batch_timeout: Annotated[float, Number] = Field(
        0.005,
        ge=0,
        le=1,
        description="Seconds a free worker gathers requests into a batch; a request that comes after that "
        "runs at once.",
    )
    api_key: str | None = Field(
        None,
        description="Require this key in the X-API-Key header of /predict requests; /health and the page stay "
        "open (default: $FMNIST_SERVE_API_KEY; unset: the server is open, and says so).",
    )
    max_upload_mb: Annotated[float, Number] = Field(
        10.0, gt=0, description="Refuse uploads larger than this many MB (413)."
    )
    invert: bool = Field(True, description="Invert images with a light background, as predict does.")


class ServeRun(Sectioned):
    """What `fmnist serve` reads: the device (from the hardware section) and how to serve."""

    hardware: HardwareSettings = HardwareSettings()
    serve: ServeSettings = ServeSettings()


class EvaluationRun(Sectioned):
    """What evaluating a checkpoint reads (`fmnist test`, `predict-samples`, `report`): the model's
    own settings are in the checkpoint."""

    hardware: HardwareSettings = HardwareSettings()
    data: DataSettings = DataSettings()
    evaluation: EvaluationSettings = EvaluationSettings()


class Settings(Sectioned):
    """Everything that defines a training run. Field names of the sections are the YAML keys and CLI options."""

    model: ModelSettings = ModelSettings()
    optimisation: OptimisationSettings = OptimisationSettings()
    data: DataSettings = DataSettings()
    augmentation: AugmentationSettings = AugmentationSettings()
    hardware: HardwareSettings = HardwareSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    run: RunSettings = RunSettings()
    toolkit: ToolkitSettings = ToolkitSettings()
    tracking: TrackingSettings = TrackingSettings()

    def evaluation_run(self) -> EvaluationRun:
        """The part of these settings that evaluating the trained model reads."""
        return EvaluationRun(hardware=self.hardware, data=self.data, evaluation=self.evaluation)


BenchPath = Literal["raw", "fmnist", "typical", "fmnist-fast"]
TRAIN_IMAGES = 55000  # the training split: what one epoch of `bench --epochs` means


class BenchConfig(FlatModel):
    """What `fmnist bench` measures: the network a bare `fmnist fit` trains (the tutorial CNN with
    its dropout) along several paths, in one process on one device, from the data already on this
    machine.

    Its few settings are its own; those it shares with `fit` (layout, batch sizes, compile) default
    to fit's, so the `fmnist` path is what `fmnist fit` runs. Every path starts from seed 0, and
    `precision` is a list (each path in each). `bench.py` builds the training run's settings of
    the `fmnist` paths from them.
    """

    accelerator: Accelerator = Field("auto", description="Lightning accelerator (one device).")
    channels_last: bool = Field(
        ModelSettings.model_fields["channels_last"].default, description="channels_last memory layout in every path."
    )
    compile: bool = Field(False, description="Compile the network with torch.compile (compilation is untimed).")
    batch_size: int = Field(128, gt=0, description="Images per training step.")
    eval_batch_size: int = Field(
        EvaluationSettings.model_fields["eval_batch_size"].default, gt=0, description="Images per evaluation batch."
    )
    data_dir: str = Field("data", description="Folder with the Fashion-MNIST IDX files (never downloaded here).")
    quick: bool = Field(False, description="Default to 40 measured steps after 5: well under 3 minutes.")
    steps: int = Field(400, gt=0, description="Measured training steps per path (40 with --quick).")
    warmup_steps: int = Field(20, ge=0, description="Steps timed apart first (5 with --quick).")
    epochs: Annotated[float, Number] = Field(
        0.0, ge=0, description="Measure this many 55k epochs instead of --steps (0: use --steps)."
    )
    paths: Annotated[tuple[BenchPath, ...], BeforeValidator(comma_list)] = Field(
        ("raw", "fmnist", "typical"), min_length=1, description="Comma-separated: raw, fmnist, typical, fmnist-fast."
    )
    repeats: int = Field(
        1,
        ge=1,
        description="Rounds over all paths, each in a rotated order; speeds and ratios are reported as "
        "mean +- std over the rounds (ratios are taken within each round).",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Random seed of every path.")
    precision: Annotated[tuple[Precision, ...], BeforeValidator(comma_list)] = Field(
        ("auto",),
        min_length=1,
        description="Comma-separated precisions, each path measured in each (fmnist-fast picks its own): auto, "
        "32-true, bf16-mixed, 16-mixed (GPU). With two, each path's speed ratio between them (median of the rounds).",
    )

    @model_validator(mode="before")
    @classmethod
    def _steps(cls, data: Any) -> Any:
        """--quick changes the step defaults; --epochs sets the steps (numbers only: the type
        checks that follow judge the rest)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("quick") is True:
            data.setdefault("steps", 40)
            data.setdefault("warmup_steps", 5)
        epochs = number_from_text(data.get("epochs", 0))
        batch = data.get("batch_size", cls.model_fields["batch_size"].default)
        warmup = data.get("warmup_steps", cls.model_fields["warmup_steps"].default)
        numbers = all(type(v) in (int, float) for v in (epochs, batch, warmup))
        if numbers and epochs > 0 and batch > 0:
            data["steps"] = max(1, round(epochs * TRAIN_IMAGES / batch) - warmup)
        return data


class ResultsSettings(FlatModel):
    """What `fmnist results` reads from run folders."""

    targets: Annotated[tuple[Annotated[float, Number, Field(gt=0, le=1)], ...], BeforeValidator(comma_list)] = Field(
        (0.91, 0.93, 0.94, 0.95),
        min_length=1,
        description="Comma-separated validation accuracies: each row gives the training minutes until its runs "
        "first reached each.",
    )
