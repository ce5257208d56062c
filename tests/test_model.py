"""The tutorial network, the LightningModule, checkpoints and the classification report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmnist_lightning.checkpoints import load_classifier, read_checkpoint
from fmnist_lightning.data import CLASS_NAMES, to_float_images
from fmnist_lightning.errors import CheckpointError
from fmnist_lightning.model import FashionClassifier
from fmnist_lightning.networks import ConvNet, build_network
from tests.helpers import classifier, need


def test_tutorial_network_has_356234_parameters_and_tf_same_shapes() -> None:
    net = ConvNet()
    assert sum(p.numel() for p in net.parameters()) == 356_234
    x = torch.zeros(2, 1, 28, 28)
    sizes = []
    for layer in net.features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            sizes.append(tuple(x.shape[1:]))
    assert sizes == [(32, 14, 14), (64, 7, 7), (128, 4, 4)]
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_pooling_before_relu_is_the_tutorials_conv_relu_pool_exactly() -> None:
    net = ConvNet()
    tutorial_order = nn.Sequential()  # conv -> ReLU -> pool, the same modules (so the same weights)
    for i in range(0, len(net.features), 4):
        conv, pool, relu, _ = net.features[i : i + 4]
        tutorial_order.extend([conv, nn.ReLU(), pool])
    x = torch.randn(16, 1, 28, 28)
    ours, theirs = net.features(x), tutorial_order(x)
    assert torch.equal(ours, theirs)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, list(net.features.parameters()), grad)
    theirs_grads = torch.autograd.grad(theirs, list(net.features.parameters()), grad)
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, theirs_grads))


def test_xavier_init_and_zero_biases() -> None:
    conv = ConvNet().features[0].requires_grad_(False)
    bound = (6 / (1 * 9 + 32 * 9)) ** 0.5
    assert float(conv.weight.abs().max()) <= bound
    assert float(conv.bias.abs().max()) == 0.0


def test_dropout_switch() -> None:
    with_dropout = build_network("convnet", True, 0.25, 0.3)
    without = build_network("convnet", False, 0.25, 0.3)
    assert sum(isinstance(m, nn.Dropout) for m in with_dropout.modules()) == 4
    assert not any(isinstance(m, nn.Dropout) for m in without.modules())
    assert with_dropout.state_dict().keys() == without.state_dict().keys()


@pytest.mark.parametrize("p", [0.25, 0.3])
def test_cpu_dropout_keeps_1_minus_p_scales_the_kept_and_is_identity_in_eval(p: float) -> None:
    from fmnist_lightning.networks import Dropout

    torch.manual_seed(0)
    drop = Dropout(p)
    x = torch.rand(400, 32, 14, 14).add_(0.5).requires_grad_()  # all positive: zero means dropped
    y = drop(x)
    kept = y != 0
    # 2.5M draws: the kept fraction's standard error is about 0.0003
    assert float(kept.float().mean()) == pytest.approx(1 - p, abs=0.002)
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.allclose(grad, kept.float() / (1 - p))  # gradient flows through the kept values only
    # Channels_last stays channels_last (the layout the training step runs in).
    assert drop(x.detach().contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last
    )
    # Under bf16 autocast the values are bf16; the mask keeps 1 - p as finely (bf16 uniforms would
    # lie on a 1/256 grid, which would keep 0.698 instead of 0.7 at p=0.3).
    kept_bf16 = drop(x.detach().bfloat16()) != 0
    assert float(kept_bf16.float().mean()) == pytest.approx(1 - p, abs=0.001)
    # Four values come from each 64-bit draw, whose top bit is always 0: every one of the four
    # positions must keep 1 - p too (the highest would keep only half as often if the sign counted).
    for lane in range(4):
        assert float(kept.flatten()[lane::4].float().mean()) == pytest.approx(1 - p, abs=0.003)
    drop.eval()
    assert drop(x) is x


@pytest.mark.parametrize("name", ["convnet-bn", "resnet"])
def test_other_networks_produce_logits(name: str) -> None:
    net = build_network(name, True, 0.2, 0.2).eval()
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_standardisation_is_part_of_the_model() -> None:
    plain = classifier(dropout=False)
    standardised = classifier(dropout=False, input_mean=0.3, input_std=0.35)
    standardised.net.load_state_dict(plain.net.state_dict())
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(standardised(x), plain((x - 0.3) / 0.35), atol=1e-5)


def test_checkpoint_round_trip_restores_the_variant(trained_run: Path) -> None:
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    model = FashionClassifier.load_from_checkpoint(ckpt, map_location="cpu")  # no extra arguments
    assert model.hparams["dropout"] is False
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    hp = read_checkpoint(ckpt)["hyper_parameters"]
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
    again = load_classifier(ckpt)
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(model.eval()(x), again(x))


def test_checkpoint_records_versions(trained_run: Path) -> None:
    ours = read_checkpoint(trained_run / "checkpoints" / "last.ckpt")["fmnist_lightning"]
    assert {"format", "fmnist_lightning", "torch", "lightning", "git_commit"} <= ours.keys()


def test_other_programs_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointError, match="not written by fmnist-lightning"):
        load_classifier(path)


def test_report_matches_scikit_learn(trained_run: Path, cli, tmp_path: Path) -> None:
    """fmnist test's numbers equal scikit-learn's classification_report on the same predictions."""
    need("sklearn", "test")
    from sklearn import metrics as sklearn_metrics

    out = tmp_path / "report"
    code, stdout, err = cli("test", "--ckpt", trained_run / "checkpoints" / "best.ckpt", "--offline", "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = (out / "predictions.csv").read_text().splitlines()
    header, body = rows[0].split(","), [r.split(",") for r in rows[1:]]
    assert header[:3] == ["index", "label", "predicted"] and len(header) == 13
    assert [int(r[0]) for r in body] == list(range(10000))
    labels = [int(r[1]) for r in body]
    predicted = [int(r[2]) for r in body]
    reference = sklearn_metrics.classification_report(
        labels, predicted, target_names=list(CLASS_NAMES), output_dict=True, zero_division=0
    )
    assert report["num_samples"] == 10000
    assert report["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6)
    for name in CLASS_NAMES:
        ours, theirs = report["per_class"][name], reference[name]
        assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-5)
        assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-5)
        assert ours["f1"] == pytest.approx(theirs["f1-score"], abs=1e-5)
        assert ours["support"] == theirs["support"] == 1000
    for key, ref in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        for metric, ref_metric in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert report[key][metric] == pytest.approx(reference[ref][ref_metric], abs=1e-5)
    assert report["confusion_matrix"] == sklearn_metrics.confusion_matrix(labels, predicted).tolist()
    assert "macro avg" in stdout and "weighted avg" in stdout
    probs = torch.tensor([[float(v) for v in r[3:]] for r in body])
    assert torch.allclose(probs.sum(dim=1), torch.ones(10000), atol=1e-4)
    assert torch.equal(probs.argmax(dim=1), torch.tensor(predicted))


def test_fast_evaluation_layout_gives_the_same_predictions(trained_run: Path, datamodule) -> None:
    images = to_float_images(datamodule.split("test")[0][:2000])
    plain = load_classifier(trained_run / "checkpoints" / "best.ckpt")
    fast = load_classifier(trained_run / "checkpoints" / "best.ckpt").to_channels_last()
    with torch.inference_mode():
        a, b = plain(images).softmax(dim=1), fast(images).softmax(dim=1)
    assert torch.equal(a.argmax(dim=1), b.argmax(dim=1))
    assert torch.allclose(a, b, atol=1e-4)


def test_tta_averages_each_test_image_with_its_mirror(trained_run: Path, datamodule, cli, tmp_path: Path) -> None:
    """`fmnist test --tta`: each image's probabilities are the mean of the network's on it and on
    its horizontal mirror, and report.json says so."""
    out = tmp_path / "tta"
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    # In fp32, as the model runs below (`auto` may pick bf16-mixed on this CPU).
    code, stdout, err = cli("test", "--ckpt", ckpt, "--offline", "--tta", "--out", out, "--precision", "32-true")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["tta"] is True and report["num_samples"] == 10000
    assert "each averaged with its mirror image (--tta)" in stdout
    rows = [r.split(",") for r in (out / "predictions.csv").read_text().splitlines()[1:]]
    written = torch.tensor([[float(v) for v in r[3:]] for r in rows[:500]])

    images = to_float_images(datamodule.split("test")[0][:500])
    model = load_classifier(ckpt).eval()
    with torch.inference_mode():
        expected = (model(images).softmax(dim=1) + model(images.flip(-1)).softmax(dim=1)) / 2
    assert torch.allclose(written, expected, atol=1e-4)
    assert report["accuracy"] == pytest.approx(sum(int(r[1]) == int(r[2]) for r in rows) / 10000, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_evaluation_pool_equals_pytorchs_max_pool(dtype: torch.dtype) -> None:
    """MaxPool2x2's path without gradients (pairwise maxima over channels_last memory) gives
    F.max_pool2d's values exactly, odd sizes (ceil_mode) and negative values included; with
    gradients, in the plain layout, and in exports it is PyTorch's pool."""
    from fmnist_lightning.networks import MaxPool2x2

    pool = MaxPool2x2()
    for size in (28, 14, 7, 5, 1):
        x = torch.randn(3, 16, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        expected = F.max_pool2d(x, 2, ceil_mode=True)
        with torch.inference_mode():
            fast = pool(x)
        assert torch.equal(fast, expected) and fast.is_contiguous(memory_format=torch.channels_last), size
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    (grad,) = torch.autograd.grad(pool(x).sum(), x)
    assert torch.equal(grad, torch.autograd.grad(F.max_pool2d(x, 2, ceil_mode=True).sum(), x)[0])
    assert torch.equal(pool(x.detach()), F.max_pool2d(x.detach(), 2, ceil_mode=True))  # plain layout
    # An export (ONNX's exporter runs torch.export) keeps the pool operator, which runtimes fuse.
    sample = torch.randn(2, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        graph = str(torch.export.export(pool, (sample,)).graph)
    assert "max_pool2d" in graph and "maximum" not in graph
