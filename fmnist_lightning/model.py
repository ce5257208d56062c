"""The LightningModule that trains and evaluates a network, its metrics, and its optimiser.

It only wraps a network (networks.py) chosen by name, as in Lightning's own
`backbone_image_classifier` example; `save_hyperparameters` sees primitives only, so
`FashionClassifier.load_from_checkpoint(path)` rebuilds exactly the trained variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from fmnist_lightning.data import NUM_CLASSES, Batch
from fmnist_lightning.hardware import gather_objects
from fmnist_lightning.networks import build_network
from fmnist_lightning.settings import ModelSettings, OptimisationSettings, arguments_for

CHECKPOINT_FORMAT = 2  # bumped when a checkpoint written by this package changes incompatibly


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor],
    lr: float,
    weight_decay: float,
    device: torch.device,
    clips_gradients: bool = False,
) -> torch.optim.Optimizer:
    """Adam, AdamW (decoupled weight decay) or SGD with Nesterov momentum, fused on CPUs and GPUs
    unless gradients are clipped: Lightning's mixed-precision plugin refuses to clip for a fused
    optimizer (it would unscale inside its step, after the clip), so clipping keeps the plain one."""
    kw: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if device.type in ("cpu", "cuda") and not clips_gradients:
        # One fused kernel per step instead of several elementwise passes per parameter tensor:
        # on 2 CPU cores the Adam update takes 0.5 ms instead of 1.2 ms (of a ~55 ms step).
        kw["fused"] = True
    if name == "adamw":
        return torch.optim.AdamW(params, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, momentum=0.9, nesterov=True, **kw)
    return torch.optim.Adam(params, **kw)


def classification_metrics() -> MetricCollection:
    """Accuracy, per-class and averaged precision / recall / F1, and the confusion matrix.

    The collection's compute groups let metrics with the same state (all the stat-score based
    ones) share a single update. No sync on compute: it is used by a process that already holds
    every rank's predictions (summing over ranks would count them several times).
    """
    k = NUM_CLASSES
    kw: dict[str, Any] = {"sync_on_compute": False}
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(k, average="micro", **kw),
        "confusion": MulticlassConfusionMatrix(k, **kw),
    }
    for average in ("none", "macro", "weighted"):
        metrics[f"precision_{average}"] = MulticlassPrecision(k, average=average, zero_division=0, **kw)
        metrics[f"recall_{average}"] = MulticlassRecall(k, average=average, zero_division=0, **kw)
        metrics[f"f1_{average}"] = MulticlassF1Score(k, average=average, zero_division=0, **kw)
    return MetricCollection(metrics)


class RunningMean(Metric):
    """total / count, both summed over steps and DDP ranks.

    torchmetrics' MeanMetric looks for NaNs in every update, and MulticlassAccuracy validates its
    arguments with `torch.unique`: each is a host sync per step, which on a GPU stalls a network
    this small. Adding to two device tensors needs none.
    """

    full_state_update = False
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)

    def update(self, total: torch.Tensor, count: int) -> None:
        self.total += total.detach().to(self.total.dtype)
        self.count += count

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class ConfusionCounts(Metric):
    """The confusion matrix (rows: true class), accumulated with `index_put_`: unlike `bincount`
    on a GPU, which reads the largest value back to size its output, it never syncs the host."""

    full_state_update = False
    counts: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        ones = torch.ones_like(labels)
        self.counts.index_put_((labels, logits.argmax(dim=1)), ones, accumulate=True)

    def compute(self) -> torch.Tensor:
        return self.counts


def accuracy_and_macro_f1(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy, and the mean F1 over the classes that occur (as torchmetrics' macro F1 with
    zero_division=0: a class neither present nor predicted is left out of the mean)."""
    c = confusion.double()
    tp = c.diagonal()
    fp, fn = c.sum(dim=0) - tp, c.sum(dim=1) - tp
    denominator = 2 * tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    occurring = denominator > 0
    return (tp.sum() / c.sum()).float(), (f1[occurring].sum() / occurring.sum().clamp(min=1)).float()


class FashionClassifier(L.LightningModule):
    """Softmax cross-entropy on one-hot targets; running sums for training and validation, and
    torchmetrics' full classification report once over the test set.

    Every argument is required: the defaults live in `settings/models.py` only, and a checkpoint's
    hyperparameters hold them all.
    """

    def __init__(
        self,
        *,
        network: str,
        dropout: bool,
        dropout_conv: float,
        dropout_dense: float,
        lr: float,
        optimizer: str,
        weight_decay: float,
        lr_schedule: str,
        channels_last: bool,
        input_mean: float,
        input_std: float,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(network, dropout, dropout_conv, dropout_dense)
        self.memory_format = torch.contiguous_format
        if channels_last:
            self.to_channels_last()
        # Saved in checkpoints (persistent states), so an epoch interrupted and resumed reports the
        # same train metrics.
        self.train_loss, self.train_acc = RunningMean(), RunningMean()
        self.val_loss, self.val_confusion = RunningMean(), ConfusionCounts()
        self._train_metrics_logged = False
        self.flip_tta = False  # test_step averages over each image and its mirror (set by evaluation, not saved)
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.test_results: dict[str, Any] = {}

    @classmethod
    def from_settings(
        cls, model: ModelSettings, optimisation: OptimisationSettings, input_mean: float = 0.0, input_std: float = 1.0
    ) -> FashionClassifier:
        """The model the model and optimisation sections describe: each of their settings that names
        a parameter here (a hyperparameter in the checkpoint); `input_mean`/`input_std` standardise its
        input (the train split's statistics with `standardize`). `compile` is applied by the builder,
        `batch_size` by the data module."""
        return cls(**arguments_for(cls, model, optimisation), input_mean=input_mean, input_std=input_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images in [0, 1] shaped (B, 1, 28, 28)."""
        if self.hparams["input_mean"] != 0.0 or self.hparams["input_std"] != 1.0:
            x = (x - self.hparams["input_mean"]) / self.hparams["input_std"]
        return self.net(x.contiguous(memory_format=self.memory_format))

    def to_channels_last(self) -> FashionClassifier:
        """Switch to the channels_last layout: faster convolutions and pooling (CPU and GPU), same math."""
        self.net = self.net.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last
        return self

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self(batch.images)
        loss = F.cross_entropy(logits, batch.targets)
        # Metric objects accumulate on the device; nothing here forces a host sync per step.
        n = batch.labels.numel()
        self.train_loss.update(loss.detach() * n, n)
        self.train_acc.update((logits.detach().argmax(dim=1) == batch.labels).sum(), n)
        if not self._train_metrics_logged:
            # Logging a Metric object registers it: Lightning computes it from all of the epoch's
            # updates at epoch end. Once per epoch is enough, and self.log costs ~2 ms per call
            # (as much as 3% of a CPU step), so it is not repeated at every step.
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, batch_size=len(batch.labels))
            self.log(
                "train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch.labels)
            )
            self._train_metrics_logged = True
        # No per-step value on the progress bar: showing one costs a device sync at every refresh.
        return loss

    def on_train_epoch_start(self) -> None:
        # Lightning calls this at each new epoch, not when it resumes one cut short. A last.ckpt
        # saved at an epoch's end (validation runs before Lightning computes and resets the train
        # metrics) holds that finished epoch's sums: resumed from it, the next epoch starts at zero.
        self.train_loss.reset()
        self.train_acc.reset()
        self._train_metrics_logged = False

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self(batch.images)
        self.val_loss.update(F.cross_entropy(logits.float(), batch.targets, reduction="sum"), batch.labels.numel())
        self.val_confusion.update(logits, batch.labels)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics sums both states over the DDP ranks in compute(): every rank then holds the
        # metrics of all validation images, and logs the same value. So no `sync_dist` (which
        # would average identical numbers); trainer_factory.py silences Lightning's reminder about it.
        accuracy, f1_macro = accuracy_and_macro_f1(self.val_confusion.compute())
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", accuracy, prog_bar=True)
        self.log("val/f1_macro", f1_macro)
        self.val_confusion.reset()
        self.val_loss.reset()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        # Only the logits are kept per batch. Loss and metrics are computed once, over all test
        # images, at epoch end: one update instead of one per batch (the report needs every
        # image's probabilities anyway), and no metric-state sync across DDP ranks.
        logits = flip_averaged_logits(self, batch.images) if self.flip_tta else self(batch.images).float()
        self.test_outputs.append((batch.indices.cpu(), logits.cpu(), batch.labels.cpu()))

    def on_test_epoch_start(self) -> None:
        self.test_outputs, self.test_results = [], {}

    def on_test_epoch_end(self) -> None:
        index, logits, labels = _gather_outputs(self.test_outputs)
        metrics = classification_metrics()  # every rank now holds everything
        metrics.update(logits, labels)
        values = {k: v.cpu() for k, v in metrics.compute().items()}
        values["loss"] = F.cross_entropy(logits, labels)
        values["index"], values["probabilities"] = index, logits.softmax(dim=1)
        self.log("test/loss", values["loss"])
        self.log("test/acc", values["acc"])
        self.test_results = values
        self.test_outputs = []

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        clips = bool(self.trainer.gradient_clip_val)
        opt = build_optimizer(hp["optimizer"], self.parameters(), hp["lr"], hp["weight_decay"], self.device, clips)
        if hp["lr_schedule"] == "none":
            return opt
        steps = int(self.trainer.estimated_stepping_batches)
        if hp["lr_schedule"] == "cosine":
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from fmnist_lightning.runs import provenance

        checkpoint["fmnist_lightning"] = {"format": CHECKPOINT_FORMAT, **provenance()}
        # Lightning does not save RNG states; dropout needs them for an exact resume. Every rank
        # draws its own dropout masks, so every rank's state is kept (gathered to all ranks: each
        # rank calls this hook, only rank 0 writes the file).
        checkpoint["rng_states"] = gather_objects(_rng_state(self.device))
        # The running train metrics of an epoch cut short are each rank's own partial sums, and
        # only rank 0's state_dict is written: keep their sum over ranks, which rank 0 alone
        # takes back on resume (see on_load_checkpoint), so the epoch's totals come out whole.
        state = checkpoint.get("state_dict", {})
        if self._trainer is not None:  # one process without a Trainer holds all its sums already
            for key in _train_metric_states(state):
                state[key] = self.trainer.strategy.reduce(state[key].clone(), reduce_op="sum")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rank = self.global_rank if self._trainer is not None else 0
        if rank != 0:  # rank 0 resumes the summed partial train metrics; the others start at zero
            state = checkpoint.get("state_dict", {})
            for key in _train_metric_states(state):
                state[key] = torch.zeros_like(state[key])
        states = checkpoint.get("rng_states")
        if not isinstance(states, list) or rank >= len(states):
            return  # another number of processes: each rank keeps its fresh seed + rank stream
        own = states[rank]
        torch.set_rng_state(own["torch"])
        if "cuda" in own and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"], self.device)


def flip_averaged_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Test-time flip augmentation: the log of the mean of the softmax over each image and its
    horizontal mirror. As logits, these give exactly the averaged probabilities under softmax (and
    the cross-entropy of the averaged prediction); logsumexp keeps them finite where a probability
    underflows."""
    both = torch.stack((model(images).float(), model(images.flip(-1)).float()))
    return torch.logsumexp(both.log_softmax(dim=-1), dim=0) - math.log(2)


def _train_metric_states(state_dict: dict[str, Any]) -> list[str]:
    return [key for key in state_dict if key.startswith(("train_loss.", "train_acc."))]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generator states: the CPU's, and its own GPU's (not every visible GPU's)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _gather_outputs(
    outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ranks' (index, logits, labels), concatenated and sorted by index.

    Uses all_gather_object because ranks may hold different numbers of samples (every test image
    is evaluated exactly once, so 10,000 does not split evenly over, say, 3 ranks).
    """
    if outputs:
        index, logits, labels = (torch.cat(parts) for parts in zip(*outputs))
    else:
        index, logits, labels = (
            torch.empty(0, dtype=torch.long),
            torch.empty(0, NUM_CLASSES),
            torch.empty(0, dtype=torch.long),
        )
    index, logits, labels = (torch.cat(parts) for parts in zip(*gather_objects((index, logits, labels))))
    order = torch.argsort(index)
    return index[order], logits[order], labels[order]
