"""Networks (plain `nn.Module`s) and the LightningModule that trains and evaluates them.

The LightningModule only wraps a network chosen by name, as in Lightning's own
`backbone_image_classifier` example; `save_hyperparameters` sees primitives only, so
`FashionClassifier.load_from_checkpoint(path)` rebuilds exactly the trained variant.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from fmnist_lightning.data import NUM_CLASSES, Batch

CHECKPOINT_FORMAT = 1  # bumped when a checkpoint written by this package changes incompatibly


class Dropout(nn.Dropout):
    """`nn.Dropout` whose CPU mask is drawn as `uniform >= p` rather than with `bernoulli_`.

    The distribution is the same (each value kept with probability 1 - p, then scaled by
    1 / (1 - p)), as are the gradients given the mask. PyTorch's CPU `bernoulli_` draws its numbers
    several times slower than `rand_like`, enough to make the mask cost as much as the convolution
    before it. Other devices keep the fused `F.dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # float32 even under bf16 autocast
        return x.mul(keep).mul_(1.0 / (1.0 - self.p))


def _dropout(rate: float) -> nn.Module:
    return Dropout(rate) if rate > 0 else nn.Identity()


class ConvNet(nn.Module):
    """The tutorial's CNN: three 3x3 SAME conv + ReLU + 2x2 max-pool blocks (32/64/128 filters),
    dense 128 + ReLU, dense 10 logits; Xavier-uniform weights, zero biases.

    TensorFlow's SAME max-pool takes 7 -> 4 by padding the bottom/right edge; `ceil_mode=True`
    does exactly that, giving 28 -> 14 -> 7 -> 4 and a 4*4*128 = 2048 flatten: 356,234 parameters.

    The ReLU comes after the pool: max-pooling and ReLU commute (ReLU never changes which value is
    largest), so outputs and gradients are exactly the tutorial's conv -> ReLU -> pool, while the
    ReLU touches a quarter of the values (5-10% of a CPU training step saved, in one measurement).
    """

    def __init__(self, dropout_conv: float = 0.0, dropout_dense: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((1, 32), (32, 64), (64, 128)):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.MaxPool2d(2, ceil_mode=True),
                nn.ReLU(inplace=True),
                _dropout(dropout_conv),
            ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * 4 * 128, 128),
            nn.ReLU(inplace=True),
            _dropout(dropout_dense),
            nn.Linear(128, NUM_CLASSES),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvNetBN(nn.Module):
    """A slightly deeper tutorial CNN for the improved recipe: two conv-BN-ReLU layers in the first
    two blocks, one in the third, same 32/64/128 widths and the same dense head."""

    def __init__(self, dropout_conv: float = 0.0, dropout_dense: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(1, 32), *_conv_bn(32, 32), nn.MaxPool2d(2), _dropout(dropout_conv),
            *_conv_bn(32, 64), *_conv_bn(64, 64), nn.MaxPool2d(2), _dropout(dropout_conv),
            *_conv_bn(64, 128), nn.MaxPool2d(2, ceil_mode=True), _dropout(dropout_conv),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * 4 * 128, 128, bias=False),
            nn.BatchNorm1d(128),
            nn.ReLU(inplace=True),
            _dropout(dropout_dense),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual network for GPUs: stem 64, stages 64/128/256 of two basic blocks each."""

    def __init__(self, dropout_conv: float = 0.0, dropout_dense: float = 0.0) -> None:
        super().__init__()
        del dropout_conv  # batch norm and shortcuts regularise the conv stages
        layers: list[nn.Module] = [*_conv_bn(1, 64)]
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), _dropout(dropout_dense), nn.Linear(cin, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


NETWORKS: dict[str, type[nn.Module]] = {"convnet": ConvNet, "convnet-bn": ConvNetBN, "resnet": ResNet}


def build_network(name: str, dropout: bool, dropout_conv: float, dropout_dense: float) -> nn.Module:
    rates = (dropout_conv, dropout_dense) if dropout else (0.0, 0.0)
    return NETWORKS[name](*rates)


def build_optimizer(
    name: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """Adam, AdamW (decoupled weight decay) or SGD with Nesterov momentum, fused on CPUs and GPUs."""
    kw: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if device.type in ("cpu", "cuda"):
        # One fused kernel per step instead of several elementwise passes per parameter tensor:
        # on 2 CPU cores the Adam update takes 0.5 ms instead of 1.2 ms (of a ~55 ms step).
        kw["fused"] = True
    if name == "adamw":
        return torch.optim.AdamW(params, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, momentum=0.9, nesterov=True, **kw)
    return torch.optim.Adam(params, **kw)


def classification_metrics(prefix: str, sync_on_compute: bool = True) -> MetricCollection:
    """Accuracy, per-class and averaged precision / recall / F1, and the confusion matrix.

    The collection's compute groups let metrics with the same state (all the stat-score based
    ones) share a single update per batch. `sync_on_compute=False` is for a process that already
    holds every rank's predictions (summing over ranks would count them several times).
    """
    k = NUM_CLASSES
    kw: dict[str, Any] = {"sync_on_compute": sync_on_compute}
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(k, average="micro", **kw),
        "confusion": MulticlassConfusionMatrix(k, **kw),
    }
    for average in ("none", "macro", "weighted"):
        metrics[f"precision_{average}"] = MulticlassPrecision(k, average=average, zero_division=0, **kw)
        metrics[f"recall_{average}"] = MulticlassRecall(k, average=average, zero_division=0, **kw)
        metrics[f"f1_{average}"] = MulticlassF1Score(k, average=average, zero_division=0, **kw)
    return MetricCollection(metrics, prefix=prefix)


class FashionClassifier(L.LightningModule):
    """Softmax cross-entropy on one-hot targets, Adam by default, torchmetrics for every split."""

    def __init__(
        self,
        network: str = "convnet",
        dropout: bool = True,
        dropout_conv: float = 0.25,
        dropout_dense: float = 0.3,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        lr_schedule: str = "none",
        channels_last: bool = False,
        input_mean: float = 0.0,
        input_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(network, dropout, dropout_conv, dropout_dense)
        self.memory_format = torch.contiguous_format
        if channels_last:
            self.to_channels_last()
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        # Saved in checkpoints, so an epoch interrupted and resumed reports the same train metrics.
        self.train_loss.persistent(True)
        self.train_acc.persistent(True)
        self.val_metrics = classification_metrics("val/")
        self._train_metrics_logged = False
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.test_results: dict[str, Any] = {}

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
        self.train_loss.update(loss.detach(), weight=batch.labels.numel())
        self.train_acc.update(logits.detach(), batch.labels)
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
        self._train_metrics_logged = False

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self(batch.images)
        self.val_loss.update(F.cross_entropy(logits.float(), batch.targets), weight=batch.labels.numel())
        self.val_metrics.update(logits, batch.labels)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", values["val/acc"], prog_bar=True)
        self.log("val/f1_macro", values["val/f1_macro"])
        self.val_metrics.reset()
        self.val_loss.reset()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        # Only the logits are kept per batch. Loss and metrics are computed once, over all test
        # images, at epoch end: one update instead of one per batch (the report needs every
        # image's probabilities anyway), and no metric-state sync across DDP ranks.
        logits = self(batch.images).float()
        self.test_outputs.append((batch.indices.cpu(), logits.cpu(), batch.labels.cpu()))

    def on_test_epoch_start(self) -> None:
        self.test_outputs, self.test_results = [], {}

    def on_test_epoch_end(self) -> None:
        index, logits, labels = _gather_outputs(self.test_outputs)
        metrics = classification_metrics("", sync_on_compute=False)  # every rank now holds everything
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
        opt = build_optimizer(hp["optimizer"], self.parameters(), hp["lr"], hp["weight_decay"], self.device)
        if hp["lr_schedule"] == "none":
            return opt
        steps = int(self.trainer.estimated_stepping_batches)
        if hp["lr_schedule"] == "cosine":
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from fmnist_lightning.config import provenance

        checkpoint["fmnist_lightning"] = {"format": CHECKPOINT_FORMAT, **provenance()}
        # Lightning does not save RNG states; dropout needs them for an exact resume.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states", {})
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])


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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (index, logits, labels))
        index, logits, labels = (torch.cat(parts) for parts in zip(*gathered))
    order = torch.argsort(index)
    return index[order], logits[order], labels[order]
