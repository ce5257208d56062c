"""What the first GPU or multi-GPU run would have hit, checked on the CPU: host syncs per step,
training time that counted validation, stops lost under DDP, per-rank RNG, emulated bf16."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode

from fmnist_lightning.callbacks import FiniteLossGuard, GracefulInterrupt, SeedRanks
from fmnist_lightning.data import Batch, one_hot
from fmnist_lightning.errors import NonFiniteLoss, TrainingInterrupted
from fmnist_lightning.settings import Settings
from tests.helpers import classifier

# Calls that read a device value back to the host (or, like unique/nonzero/bincount on CUDA, need
# its size): each one stalls a GPU until everything queued before it has run.
SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.unique,
    torch.Tensor.unique,
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.bincount,
    torch.Tensor.bincount,
    torch.any,
    torch.Tensor.any,
}


class SyncCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in SYNCING:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _batch(n: int = 16) -> Batch:
    labels = torch.arange(n) % 10
    return Batch(torch.rand(n, 1, 28, 28), one_hot(labels), labels, torch.arange(n))


def test_training_and_validation_steps_never_read_values_back_to_the_host() -> None:
    model = classifier()
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer here
    counter = SyncCounter()
    with counter:
        for step in range(3):
            model.training_step(_batch(), step)
        model.eval()
        with torch.no_grad():
            for step in range(3):
                model.validation_step(_batch(), step)
    assert counter.calls == []
    # ... and the running sums give what torchmetrics would.
    assert model.train_loss.count == 48 and model.val_loss.count == 48
    assert int(model.val_confusion.compute().sum()) == 48


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


class SlowValidation(Callback):
    """Makes validation take over 2 s, and times the epoch and its validation from the outside."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def on_train_epoch_start(self, *args: Any) -> None:
        self.marks["epoch_start"] = time.perf_counter()

    def on_validation_epoch_start(self, *args: Any) -> None:
        self.marks["val_start"] = time.perf_counter()

    def on_validation_batch_end(self, *args: Any) -> None:
        time.sleep(2.0)

    def on_validation_epoch_end(self, *args: Any) -> None:
        self.marks["val_end"] = time.perf_counter()

    def on_train_epoch_end(self, *args: Any) -> None:
        self.marks["epoch_end"] = time.perf_counter()


def test_training_time_excludes_the_validation_inside_fit(real_data: None, tmp_path: Path) -> None:
    from fmnist_lightning.training import run_fit

    s = Settings(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, offline=True, progress=False, accelerator="cpu"
    )
    slow = SlowValidation()
    run_fit(s, out=tmp_path / "run", extra_callbacks=[slow])
    with (tmp_path / "run" / "metrics.csv").open() as f:
        row = next(csv.DictReader(f))
    m = slow.marks
    epoch, validation = m["epoch_end"] - m["epoch_start"], m["val_end"] - m["val_start"]
    assert validation >= 2.0
    assert float(row["train_time_s"]) == pytest.approx(epoch - validation, abs=0.3)  # not `epoch`
    assert float(row["images_per_s"]) == pytest.approx(3 * 128 / float(row["train_time_s"]), rel=0.01)
    assert row["gpu_peak_mb"] == ""  # only on a GPU


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

    def bf16(including_emulation: bool = True) -> bool:
        return including_emulation  # emulated only

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    assert hardware.resolve_hardware("gpu", "1", "auto", "auto").precision == "16-mixed"
    with pytest.raises(Exception, match="cannot do bf16-mixed natively"):
        hardware.resolve_hardware("gpu", "1", "auto", "bf16-mixed")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert hardware.resolve_hardware("gpu", "1", "auto", "auto").precision == "bf16-mixed"
