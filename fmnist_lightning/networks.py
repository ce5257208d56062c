"""The networks, as plain `nn.Module`s: the tutorial's CNN and two stronger ones.

They know nothing of Lightning; `model.FashionClassifier` wraps the one a run's settings name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmnist_lightning.data import NUM_CLASSES


class Dropout(nn.Dropout):
    """`nn.Dropout` whose CPU mask is drawn as random 16-bit integers, four from each 64-bit draw.

    PyTorch's CPU generator gives one float per draw, in a serial loop: `rand_like` for the
    tutorial CNN's four masks took about 6.4 ms of a 35 ms bf16 training step on 2 cores (its
    slowest kernel after the convolutions' backward), `bernoulli_` twice that. Filling a quarter
    as many int64 takes about 1.5 ms. A value is kept when its 16 bits (as a signed integer) are at
    least -2**15 + round(p * 2**16): a keep probability within 1e-5 of 1 - p (exact for p = 0.25),
    independently for each value. The mask is a 0/1 tensor of x's dtype and layout (multiplying by
    a bool mask would convert it in both passes, and `torch.where` is slower still); the kept
    values are scaled by 1 / (1 - p) as `nn.Dropout` does. Other devices keep the fused `F.dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        n = x.numel()
        # The full signed range: each of an int64's four 16-bit parts is uniform (random_() alone
        # draws from [0, 2**63), whose highest part would never be negative).
        draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        bits = draws.view(torch.int16)[:n].as_strided(x.shape, x.stride())  # laid out as x is
        keep = (bits >= round(self.p * 2**16) - 2**15).to(x.dtype)
        return x.mul(keep).mul_(1.0 / (1.0 - self.p))


class MaxPool2x2(nn.MaxPool2d):
    """TensorFlow's SAME 2x2 max-pool, stride 2 (`ceil_mode`: 7 -> 4), with a faster CPU path for
    evaluation.

    PyTorch's CPU max-pool computes the argmax indices even when nothing needs them: for the
    tutorial CNN's evaluation in channels_last bf16 it took a third of the time (3.2 ms of a batch
    of 250 for the first pool alone). Without gradients, on a 4-d channels_last CPU tensor, the
    same values come from two elementwise maxima over the NHWC memory: rows in pairs, then columns
    in pairs (a -inf row or column pads an odd size first, as ceil_mode does): about 3x faster for
    the first pool, and equal to `F.max_pool2d` value for value. Training, exports and other
    devices use PyTorch's pool.
    """

    def __init__(self) -> None:
        super().__init__(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
        gradients = torch.is_grad_enabled() and x.requires_grad
        plain = x.dim() != 4 or x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last)
        if exporting or gradients or plain:
            return super().forward(x)
        n, c, h, w = x.shape
        y = x.permute(0, 2, 3, 1)  # the NHWC tensor that channels_last memory holds
        if h % 2 or w % 2:
            y = F.pad(y, (0, 0, 0, w % 2, 0, h % 2), value=float("-inf"))
            h, w = h + h % 2, w + w % 2
        y = y.reshape(n, h // 2, 2, w, c)
        y = torch.maximum(y[:, :, 0], y[:, :, 1]).view(n, h // 2, w // 2, 2 * c)  # rows; then columns
        return torch.maximum(y[..., :c], y[..., c:]).permute(0, 3, 1, 2)


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
                MaxPool2x2(),
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
            *_conv_bn(1, 32), *_conv_bn(32, 32), MaxPool2x2(), _dropout(dropout_conv),
            *_conv_bn(32, 64), *_conv_bn(64, 64), MaxPool2x2(), _dropout(dropout_conv),
            *_conv_bn(64, 128), MaxPool2x2(), _dropout(dropout_conv),
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
