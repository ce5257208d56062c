"""What the first GPU or multi-GPU run would have hit, checked on the CPU: host syncs per step,
training time that counted validation, stops lost under DDP, per-rank RNG, emulated bf16."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode

from fmnist_lightning.callbacks import FiniteLossGuard, GracefulInterrupt, SeedRanks
from fmnist_lightning.data import Batch
from fmnist_lightning.errors import NonFiniteLoss, TrainingInterrupted
from fmnist_lightning.model import FashionClassifier
from fmnist_lightning.settings import Settings
from tests.helpers import TINY, classifier

# Calls that read a device value back to the host (as a Python number, bool, list, array or text):
# each stalls a GPU's host thread until everything queued before it has run.
READS_BACK = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.__complex__,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
    torch.equal,
    torch.Tensor.equal,
    torch.allclose,
    torch.Tensor.allclose,
}
# Calls whose output's size depends on the values: allocating it needs them on the host first.
SIZED_BY_VALUES = {
    torch.unique,
    torch.Tensor.unique,
    torch.unique_consecutive,
    torch.Tensor.unique_consecutive,
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.argwhere,
    torch.Tensor.argwhere,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.bincount,
    torch.Tensor.bincount,
}
# Indexing with a boolean mask is a nonzero() on the mask (reading or writing).
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put}
# Copies between devices. These tests run on the CPU, which stands in for the GPU, so which copies
# would cross between host and device is told from how the step names the target: a string naming
# the CPU ("cpu"), or a torch.device("cpu") the step made, is the host; a device taken from a tensor
# (`x.device`, `self.device`) is the device the step runs on, here and on a GPU. A copy_ can only be
# told by its tensors' devices, which are all the CPU here: every copy_ in a step counts.
COPIES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_}


def _has_mask(index: Any) -> bool:
    if isinstance(index, (tuple, list)):
        return any(_has_mask(i) for i in index)
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


def _names_a_device(arg: Any) -> bool:
    return isinstance(arg, (str, int, torch.device)) and not isinstance(arg, bool)  # "cpu", 0, torch.device


class SyncCounter(TorchFunctionMode):
    """Records the calls made while it is active that would sync a GPU with its host; `seen`
    counts every torch call, so a test can tell that the counter was on at all."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.seen = 0
        self.host_devices: list[torch.device] = []  # torch.device("cpu") objects made while counting

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.seen += 1
        if (how := self.syncing(func, tuple(args), kwargs)) is not None:
            self.calls.append(how)
        result = func(*args, **kwargs)
        if func is torch.device and result.type == "cpu":
            self.host_devices.append(result)
        return result

    def syncing(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """How this call syncs the host with the device, or None when it does not."""
        name = getattr(func, "__name__", str(func))
        if func in READS_BACK or func in SIZED_BY_VALUES:
            return name
        if func is torch.where and len(args) + len(kwargs) == 1:
            return "where(condition)"  # torch.nonzero by another name
        if func is torch.repeat_interleave or func is torch.Tensor.repeat_interleave:
            counts_are_values = len(args) == 1 or isinstance(args[1], torch.Tensor)
            return name if counts_are_values and kwargs.get("output_size") is None else None
        if func in INDEXING and len(args) > 1 and _has_mask(args[1]):
            return f"{name} with a boolean mask"
        if func is torch.Tensor.copy_:
            return name
        if func in COPIES:
            targets = [kwargs.get("device"), *args[1:]]
            target = next((t for t in targets if _names_a_device(t)), None)
            if func is torch.Tensor.cuda or isinstance(target, int):
                return f"{name} to a GPU"  # from the host, or from another GPU
            if isinstance(target, str) and torch.device(target).type == "cpu":
                return f"{name} to the host"
            if isinstance(target, torch.device) and any(target is host for host in self.host_devices):
                return f"{name} to the host"
            if isinstance(target, (str, torch.device)) and torch.device(target) != args[0].device:
                return f"{name} to {target}"
        return None


SYNCS = {  # one of each kind of sync, for the counter's own test
    "item": lambda t, m: t.sum().item(),
    "tolist": lambda t, m: t.tolist(),
    "__float__": lambda t, m: float(t[0]),
    "__bool__": lambda t, m: bool(t[0] > 0),
    "__index__": lambda t, m: [0, 1][t.long()[0]],
    "__format__": lambda t, m: f"{t[0]:.2f}",
    "cpu": lambda t, m: t.cpu(),
    "to to the host": lambda t, m: t.to("cpu"),
    "to to the host (a device)": lambda t, m: t.to(torch.device("cpu"), torch.float64),
    "to to the host (keywords)": lambda t, m: t.to(device="cpu", non_blocking=True),
    "copy_": lambda t, m: torch.empty(4).copy_(t),
    "__getitem__ with a boolean mask": lambda t, m: t[m],
    "__setitem__ with a boolean mask": lambda t, m: t.clone().__setitem__(m, 0.0),
    "index_put_ with a boolean mask": lambda t, m: t.clone().index_put_((m,), torch.tensor(0.0)),
    "nonzero": lambda t, m: m.nonzero(),
    "where(condition)": lambda t, m: torch.where(m),
    "masked_select": lambda t, m: t.masked_select(m),
    "unique": lambda t, m: torch.unique(t),
    "bincount": lambda t, m: torch.bincount(m.long()),
    "repeat_interleave": lambda t, m: t.repeat_interleave(m.long()),
    "equal": lambda t, m: torch.equal(t, t),
}


@pytest.mark.parametrize("expected", SYNCS)
def test_the_sync_counter_sees_each_kind_of_sync(expected: str) -> None:
    t, mask = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([True, False, True, False])
    counter = SyncCounter()
    with counter:
        SYNCS[expected](t, mask)
    assert expected.split(" (")[0] in counter.calls, counter.calls


def test_the_sync_counter_passes_what_stays_on_the_device() -> None:
    t, mask = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([True, False, True, False])
    counter = SyncCounter()
    with counter:
        torch.where(mask, t, 0.0).sum(), torch.zeros(3).index_put_((torch.tensor([0, 2]),), torch.ones(2))
        t[1:3], t[torch.tensor([0, 2])], t.argmax(), t.repeat_interleave(2), t.to(torch.float64)
        t.to(t.device), t.to(mask), t.to(device=mask.device, dtype=torch.float16)  # stays where it is
    assert counter.calls == [] and counter.seen > 0


def _batches(n: int, batch_size: int, seed: int, **kw: Any) -> Any:
    from fmnist_lightning.data import TensorBatches

    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
    return TensorBatches(images, torch.randint(0, 10, (n,), generator=gen), batch_size, seed=seed, **kw)


class CountedClassifier(FashionClassifier):
    """The project's module, its training and validation steps (self.log included) under a SyncCounter."""

    counter: SyncCounter

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        with self.counter:
            return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        with self.counter:
            super().validation_step(batch, batch_idx)


class Torchmetrics(Callback):
    """torchmetrics' metrics on the logits each step computed (taken by a forward hook on the
    network), and the module's running sums after every step, side by side."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.train_pairs: list[tuple[float, float, float, float]] = []  # (our loss, theirs, our acc, theirs)
        self.val_pairs: list[tuple[float, float]] = []  # (our loss, theirs)
        self.confusions: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ours, theirs)

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        module.net.register_forward_hook(lambda net, inputs, logits: self.logits.append(logits.detach().clone()))

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy

        self.train_loss, self.train_acc = MeanMetric(), MulticlassAccuracy(10, average="micro")

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Batch, batch_idx: int) -> None:
        (logits,) = self.logits  # one forward per step: these are the step's logits, dropout and all
        self.logits.clear()
        self.train_loss.update(F.cross_entropy(logits, batch.targets), weight=len(batch.labels))
        self.train_acc.update(logits, batch.labels)
        ours = [float(m.total / m.count) for m in (module.train_loss, module.train_acc)]
        self.train_pairs.append((ours[0], float(self.train_loss.compute()), ours[1], float(self.train_acc.compute())))

    def on_validation_epoch_start(self, trainer: Any, module: Any) -> None:
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

        self.val_loss, self.val_acc = MeanMetric(), MulticlassAccuracy(10, average="micro")
        self.val_f1 = MulticlassF1Score(10, average="macro", zero_division=0)
        self.val_confusion = MulticlassConfusionMatrix(10)

    def on_validation_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Batch, *args: Any) -> None:
        (logits,) = self.logits
        self.logits.clear()
        self.val_loss.update(F.cross_entropy(logits.float(), batch.targets, reduction="none"))
        for metric in (self.val_acc, self.val_f1, self.val_confusion):
            metric.update(logits, batch.labels)
        self.val_pairs.append((float(module.val_loss.total / module.val_loss.count), float(self.val_loss.compute())))
        self.confusions.append((module.val_confusion.counts.clone(), self.val_confusion.compute()))


def test_training_and_validation_steps_never_read_values_back_to_the_host() -> None:
    """Two epochs under a real Trainer (so self.log is Lightning's), with dropout, augmentation and
    label smoothing: no step syncs, and the running sums after every step, and the epoch's logged
    metrics, are what torchmetrics computes from the same logits."""
    import lightning as L

    from fmnist_lightning.data import Augment

    model = CountedClassifier(**classifier(dropout=True, lr_schedule="cosine").hparams)
    model.counter = counter = SyncCounter()
    reference = Torchmetrics()
    train = _batches(96, 32, seed=1, shuffle=True, label_smoothing=0.1, augment=Augment(2, True, 0.5))
    val = _batches(40, 32, seed=2)  # a last batch of 8
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[reference],
    )  # fmt: skip
    trainer.fit(model, train, val)

    assert counter.calls == []
    assert counter.seen > 0  # the counter was on during the steps
    assert len(reference.train_pairs) == 6 and len(reference.val_pairs) == len(reference.confusions) == 4
    for ours_loss, their_loss, ours_acc, their_acc in reference.train_pairs:
        assert ours_loss == pytest.approx(their_loss, rel=1e-5) and ours_acc == pytest.approx(their_acc, abs=1e-6)
    for ours_loss, their_loss in reference.val_pairs:
        assert ours_loss == pytest.approx(their_loss, rel=1e-5)
    for ours, theirs in reference.confusions:
        assert torch.equal(ours, theirs)
    # What self.log reported for the last epoch: that epoch's whole sums, not its first step's.
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged == pytest.approx(
        {
            "train/loss": float(reference.train_loss.compute()),
            "train/acc": float(reference.train_acc.compute()),
            "val/loss": float(reference.val_loss.compute()),
            "val/acc": float(reference.val_acc.compute()),
            "val/f1_macro": float(reference.val_f1.compute()),
        },
        rel=1e-5,
    )


def test_the_finite_loss_guard_reads_the_device_only_every_n_steps(tmp_path: Path) -> None:
    guard = FiniteLossGuard(tmp_path / "last.ckpt", check_every=50)
    trainer = SimpleNamespace(global_step=0, world_size=1, current_epoch=0, lightning_module=classifier())
    counter = SyncCounter()
    with counter:
        for step in range(1, 50):
            trainer.global_step = step
            loss = torch.tensor(float("nan") if step == 30 else 1.0)
            guard.on_train_batch_end(trainer, None, {"loss": loss}, None, step)  # type: ignore[arg-type]
    assert counter.calls == []  # step 30's NaN is only noted on the device
    trainer.global_step = 50
    with counter, pytest.raises(NonFiniteLoss, match="in epoch 1 at step 30; stopped"):
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, 50)  # type: ignore[arg-type]
    assert counter.calls == ["item"]  # one read, at step 50


def test_macro_f1_from_the_confusion_matrix_equals_torchmetrics() -> None:
    from torchmetrics.classification import MulticlassF1Score

    from fmnist_lightning.model import accuracy_and_macro_f1

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 8, (500,), generator=gen)  # classes 8 and 9 never occur
    logits = torch.randn(500, 10, generator=gen)
    logits[torch.arange(500), labels] += 1.0
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((labels, logits.argmax(1)), torch.ones_like(labels), accumulate=True)
    accuracy, f1 = accuracy_and_macro_f1(confusion)
    expected = MulticlassF1Score(10, average="macro", zero_division=0)(logits, labels)
    assert float(f1) == pytest.approx(float(expected), abs=1e-6)
    assert float(accuracy) == pytest.approx(float((logits.argmax(1) == labels).float().mean()))


class FakeClock(Callback):
    """The clock metrics.csv's timings read (callbacks.time), advanced only by the run: each training
    step takes 1 s and each validation batch 100 s, however long they really take."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def on_train_batch_end(self, *args: Any) -> None:
        self.now += 1.0

    def on_validation_batch_end(self, *args: Any) -> None:
        self.now += 100.0


def test_training_time_excludes_the_validation_inside_fit(
    real_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmnist_lightning import callbacks
    from fmnist_lightning.training import run_fit

    clock = FakeClock()
    monkeypatch.setattr(callbacks, "time", clock)
    # Validation twice an epoch (after steps 2 and 4), one batch each: 200 s inside a 4-step epoch.
    s = Settings(**{**TINY, "max_epochs": 2}, val_check_interval=0.5)
    run_fit(s, out=tmp_path / "run", extra_callbacks=[clock])
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert clock.now == 2 * (4 * 1.0 + 2 * 100.0)  # the fake clock saw every step and validation
    for row in rows:  # each epoch: its 4 steps of 1 s, not the 204 s the epoch took
        assert float(row["train_time_s"]) == 4.0
        assert float(row["images_per_s"]) == 4 * 128 / 4.0
        assert row["gpu_peak_mb"] == ""  # only on a GPU
    assert len(rows) == 2


def _fake_trainer(world_size: int, rank: int = 0, decision: bool = False) -> Any:
    strategy = SimpleNamespace(reduce_boolean_decision=lambda stop, all: stop or decision)
    return SimpleNamespace(
        world_size=world_size, global_rank=rank, global_step=0, current_epoch=0, strategy=strategy,
        save_checkpoint=lambda path: None,
    )  # fmt: skip


def test_a_signal_stops_ddp_runs_with_epochs_shorter_than_the_sync_interval(tmp_path: Path) -> None:
    callback = GracefulInterrupt(tmp_path / "checkpoints" / "last.ckpt", sync_every=20)
    trainer = _fake_trainer(world_size=8, decision=True)  # another rank got the signal
    for step in range(1, 14):  # 13 steps per epoch: never a multiple of 20
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, step - 1)  # type: ignore[arg-type]
    with pytest.raises(TrainingInterrupted, match="a signal on another rank"):
        callback.on_train_epoch_start(trainer, None)  # type: ignore[arg-type]
    trainer.global_step = 20  # keyed on the optimiser step, which every rank shares
    with pytest.raises(TrainingInterrupted):
        callback.on_train_batch_end(trainer, None, None, None, 6)  # type: ignore[arg-type]


def test_each_rank_draws_from_its_own_seed() -> None:
    """Rank r continues from seed + r whatever stream it was on before; only fitting reseeds."""

    def draws(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.rand(3)

    expected = [draws(7), draws(8)]  # seed + rank
    assert not torch.equal(expected[0], expected[1])
    with torch.random.fork_rng():
        for rank in (1, 0):
            torch.manual_seed(1234)  # some other stream, which a rank must not continue
            SeedRanks(7).setup(_fake_trainer(world_size=2, rank=rank), None, "fit")  # type: ignore[arg-type]
            assert torch.equal(torch.rand(3), expected[rank]), f"rank {rank} was not reseeded with 7 + {rank}"
        torch.manual_seed(1234)
        SeedRanks(7).setup(_fake_trainer(world_size=2, rank=1), None, "validate")  # type: ignore[arg-type]
        assert torch.equal(torch.rand(3), draws(1234))  # validate, test, predict: the stream is left alone


def test_checkpoints_keep_each_ranks_rng_state_and_restore_its_own() -> None:
    model = classifier()
    checkpoint: dict[str, Any] = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    states = checkpoint["rng_states"]
    assert isinstance(states, list) and len(states) == 1 and set(states[0]) == {"torch"}  # one CPU process
    expected = torch.rand(4)
    torch.manual_seed(123)
    model.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(4), expected)


def test_auto_precision_avoids_emulated_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A V100 or T4 'supports' bf16 only by emulation: auto must pick 16-mixed there."""
    from fmnist_lightning import hardware
    from fmnist_lightning.settings import HardwareSettings

    def bf16(including_emulation: bool = True) -> bool:
        return including_emulation  # emulated only

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    assert hardware.resolve_hardware(HardwareSettings(accelerator="gpu", devices="1")).precision == "16-mixed"
    with pytest.raises(Exception, match="cannot do bf16-mixed natively"):
        hardware.resolve_hardware(HardwareSettings(accelerator="gpu", devices="1", precision="bf16-mixed"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert hardware.resolve_hardware(HardwareSettings(accelerator="gpu", devices="1")).precision == "bf16-mixed"
