"""Every setting reaches a consumer: a consumer that forgets a setting fails here, not silently.

For each setting of a training run, the test builds what `fmnist fit` and `fmnist test` build from
the settings (the resolved hardware, the data module, the model's hyperparameters, the Trainer's
arguments, its callbacks, profiler and loggers, and evaluation's Trainer, engine and test-time
augmentation), once with the setting at a probe value and once at its default, and checks that
what they received differs. What would start work (the Trainer factory, the callbacks, the loggers,
the profilers) is replaced by recorders of their arguments; two GPUs are faked, so that each
hardware setting changes the resolved hardware on any machine.

Each setting needs a probe (a value other than its default): a new setting fails here until it has
one, and then until a consumer takes it. `config.yaml` (SaveConfig) takes every setting whole by
design, so whole settings objects are not counted as received.
"""

from __future__ import annotations

import ast
import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import loggers, profilers
from lightning.pytorch.callbacks import Callback
from pydantic import BaseModel

from fmnist_lightning import evaluation, hardware, tracking, training
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.settings import ServeSettings, Settings
from tests.helpers import classifier

PROBES: dict[str, Any] = {
    # model
    "network": "resnet",
    "dropout": False,
    "dropout_conv": 0.1,
    "dropout_dense": 0.1,
    "standardize": True,
    "channels_last": False,
    "compile": True,
    # optimisation
    "optimizer": "sgd",
    "lr": 0.01,
    "weight_decay": 0.01,
    "lr_schedule": "onecycle",
    "batch_size": 64,
    # data
    "data_dir": "elsewhere",
    "offline": True,
    "val_size": 1000,
    # augmentation
    "augment": True,
    "random_erasing": 0.25,
    "label_smoothing": 0.1,
    # hardware (on the two faked GPUs)
    "gpus": 0,
    "accelerator": "cpu",
    "devices": "1",
    "strategy": "ddp_spawn",
    "num_nodes": 2,
    "precision": "32-true",
    # evaluation
    "eval_batch_size": 500,
    "eval_engine": "onnxruntime",
    "tta": True,
    # run
    "max_epochs": 3,
    "seed": 1,
    "deterministic": True,
    "progress": False,
    "checkpoint_every_n_steps": 0,
    "limit_train_batches": 10,
    "limit_val_batches": 0.5,
    "val_check_interval": 0.5,
    "check_val_every_n_epoch": 2,
    "fast_dev_run": True,
    "overfit_batches": 2,
    "profiler": "simple",
    # toolkit
    "early_stopping_patience": 3,
    "early_stopping_monitor": "val/loss",
    "early_stopping_min_delta": 0.01,
    "stop_at_val_acc": 0.9,
    "gradient_clip_val": 1.0,
    "gradient_clip_algorithm": "value",
    "accumulate_grad_batches": 2,
    "weight_averaging": "ema",
    "ema_decay": 0.99,
    "swa_start": 0.5,
    # tracking
    "logger": ("csv",),
    "tracking_uri": "sqlite:///elsewhere.db",
    "experiment": "another",
}
# Settings that act only together with another one: their probe is set on top of that one.
CONTEXT: dict[str, dict[str, Any]] = {
    "early_stopping_monitor": {"early_stopping_patience": 3},
    "early_stopping_min_delta": {"early_stopping_patience": 3},
    "ema_decay": {"weight_averaging": "ema"},
    "swa_start": {"weight_averaging": "swa"},
    "tracking_uri": {"logger": ("mlflow",)},
    "experiment": {"logger": ("mlflow",)},
}
PRIMITIVES = (bool, int, float, str, type(None), Path)


class Recorder:
    """Stands in for a class the consumers construct: keeps the arguments it was given."""

    run_id = "recorded"  # what an MLflow logger reports of itself

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def log_hyperparams(self, params: Any) -> None:
        pass  # the MLflow logger records the flat settings: every setting, whole (as config.yaml)


def recorder_of(cls: type) -> type:
    return type(cls.__name__, (Recorder,), {})


class Evaluated(Exception):
    """What evaluation's Trainer was given to test, raised instead of testing."""


class RecordingTrainer(Recorder):
    """Stands in for `make_trainer`; its `test` reports what evaluation gave it."""

    def test(self, model: Any, datamodule: Any, verbose: bool) -> None:
        raise Evaluated(
            {
                "trainer": plain(self),
                "tta": model.flip_tta,
                "engine": model.engine,
                "data module": attributes(datamodule),
            }
        )


def plain(value: Any) -> Any:
    """`value` as plain data to compare: a recorder as its class and arguments, a dataclass as its
    fields; a whole settings object (SaveConfig's) counts as nothing."""
    if isinstance(value, PRIMITIVES):
        return value
    if isinstance(value, BaseModel):
        return "(all settings)"
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {key: plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Recorder):
        return {"class": type(value).__name__, "args": plain(value.args), "kwargs": plain(value.kwargs)}
    return type(value).__name__


def attributes(obj: Any) -> dict[str, Any]:
    """An object's own plain attributes (and dataclasses), e.g. a data module's."""
    return {k: plain(v) for k, v in vars(obj).items() if isinstance(v, PRIMITIVES) or is_dataclass(v)}


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`received(settings)`: what the consumers of a training run and its evaluation got from them."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "a faked GPU")
    monkeypatch.setattr(hardware, "gpu_supports_bf16", lambda: True)
    monkeypatch.setattr(training, "make_trainer", RecordingTrainer)
    monkeypatch.setattr(evaluation, "make_trainer", RecordingTrainer)
    for module, names in (
        (training, [n for n, v in vars(training).items() if isinstance(v, type) and issubclass(v, Callback)]),
        (loggers, ["TensorBoardLogger", "MLFlowLogger"]),
        (profilers, ["SimpleProfiler", "AdvancedProfiler", "PyTorchProfiler"]),
    ):
        for name in names:
            monkeypatch.setattr(module, name, recorder_of(getattr(module, name)))
    monkeypatch.setattr(tracking, "experiment_id", lambda t, store: "0")
    monkeypatch.setattr(FashionMNISTDataModule, "train_stats", lambda self: (0.3, 0.35))
    monkeypatch.setattr(evaluation, "load_classifier", lambda ckpt: classifier())

    @contextlib.contextmanager
    def engine(model: Any, name: str, hw: Any) -> Iterator[Any]:
        model.engine = name
        yield model

    monkeypatch.setattr(evaluation, "evaluation_engine", engine)
    run_dir = tmp_path / "run"

    def build(s: Settings) -> dict[str, Any]:
        shutil.rmtree(run_dir, ignore_errors=True)  # each build starts from an empty run folder
        run_dir.mkdir()
        hw = hardware.resolve_hardware(s.hardware)
        dm = training.build_datamodule(s)
        model = training.build_model(s, dm)
        trainer = training.build_trainer(s, hw, run_dir)
        with pytest.raises(Evaluated) as evaluated:
            evaluation.evaluate(run_dir / "best.ckpt", s.evaluation_run())
        return {
            "hardware": plain(hw),
            "data module": attributes(dm),
            # nn.Module.compile() compiles in place: the module keeps its compiled call here.
            "model": {**plain(dict(model.hparams)), "compiled": model.net._compiled_call_impl is not None},
            "trainer": plain(trainer),
            "evaluation": evaluated.value.args[0],
        }

    return build


def test_every_setting_has_a_probe() -> None:
    missing = set(Settings.flat_fields()) - set(PROBES)
    assert not missing, f"give each new setting a probe value in PROBES (and a consumer): {sorted(missing)}"
    assert set(PROBES) == set(Settings.flat_fields()) and set(CONTEXT) <= set(PROBES)
    for name, value in PROBES.items():
        assert Settings.flat_fields()[name].default != value, name


@pytest.mark.parametrize("name", list(PROBES))
def test_each_setting_reaches_a_consumer(name: str, received) -> None:
    base = Settings(**CONTEXT.get(name, {}))
    before = received(base)
    assert received(base) == before  # what the consumers get is the same for the same settings
    assert received(base.replace(**{name: PROBES[name]})) != before, f"no consumer received {name}"


def test_every_serve_setting_is_read_by_the_server() -> None:
    """The serve section goes whole to `fmnist serve` (its ServeOptions is a ServeSettings): each of
    its settings must be read off it, in serve.py, serve_app.py or the serve command."""
    package = Path(__file__).parent.parent / "fmnist_lightning"
    read = set()
    for module in ("serve.py", "serve_app.py", "cli.py"):
        for node in ast.walk(ast.parse((package / module).read_text())):
            owner = getattr(node, "value", None)
            owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            if isinstance(node, ast.Attribute) and owner_name in ("options", "serving"):
                read.add(node.attr)
    assert set(ServeSettings.model_fields) - read == set()
