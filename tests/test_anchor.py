"""The Keras anchor (scripts/keras_anchor.py) and the side by side (scripts/side_by_side.py), on tiny runs.

Both need the anchor's own environment (`nox -s anchor --install-only` builds .nox/anchor; elsewhere
set FMNIST_ANCHOR_PYTHON to its Python). Without it these tests skip; CI builds it (.ci/run).
The check that the anchor reads the tool's splits needs no TensorFlow: it runs here, in the tool's
environment (the anchor imports only numpy at module level).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.hardware import auto_precision
from fmnist_lightning.networks import ConvNet
from tests.helpers import subprocess_env

SCRIPTS = Path(__file__).parent.parent / "scripts"
TINY_EVAL = ["--eval-batch-sizes", "1000", "--eval-repeats", "1"]  # one warm-up and one timed pass of the test set


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def anchor_python() -> Path:
    path = script("side_by_side").default_anchor_python()
    if not path.is_file():
        pytest.skip(f"the Keras anchor's environment is absent ({path}): build it with `nox -s anchor --install-only`")
    return path


def test_the_anchor_reads_the_tools_splits(datamodule: FashionMNISTDataModule) -> None:
    splits = script("keras_anchor").load_splits(Path("data"))
    for name in ("train", "val", "test"):
        images, labels = splits[name]
        pixels, expected_labels = datamodule.split(name)
        assert images.shape == (*pixels.shape, 1) and images.dtype == np.float32  # NHWC, as Keras takes it
        assert np.array_equal(np.rint(images[..., 0] * 255).astype(np.uint8), pixels.numpy()), name
        assert np.array_equal(labels, expected_labels.numpy()), name


def test_keras_anchor_tiny_run(real_data: None, anchor_python: Path, tmp_path: Path) -> None:
    out = tmp_path / "keras.json"
    command = [anchor_python, SCRIPTS / "keras_anchor.py", "--precision", "mixed_bfloat16", "--epochs", "2",
               "--limit-steps", "3", "--skip-steps", "1", *TINY_EVAL, "--threads", "2", "--json", out]  # fmt: skip
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "training img/s per step (steady state)" in result.stdout and "test accuracy" in result.stdout
    data = json.loads(out.read_text())
    # The tool's network, counted in PyTorch: the anchor builds the same one.
    assert data["settings"]["parameters"] == sum(p.numel() for p in ConvNet(0.25, 0.3).parameters()) == 356234
    assert data["precision"] == "mixed_bfloat16" and data["versions"]["keras"].startswith("3.")
    assert data["threads"] == {"intra_op": 2, "inter_op": 2} and data["cpu"]["name"]
    # Each epoch: 3 steps of 128, the first left out of the steady state.
    assert [(e["images"], e["steady_images"]) for e in data["train"]["epochs"]] == [(384, 256), (384, 256)]
    assert data["train"]["step_images_per_s"] > 0 and data["train"]["epoch_images_per_s"] > 0
    assert data["eval"]["best_batch_size"] == 1000 and data["eval"]["images_per_s"] > 0
    assert 0 <= data["test_accuracy"] <= 1


@pytest.mark.slow  # three processes that load torch or TensorFlow: about a minute on 2 cores
def test_side_by_side_tiny_run(real_data: None, anchor_python: Path, tmp_path: Path) -> None:
    out = tmp_path / "side.json"
    command = [sys.executable, SCRIPTS / "side_by_side.py", "--rounds", "1", "--epochs", "1", "--precisions",
               "32-true", "--limit-steps", "3", "--skip-steps", "1", "--anchor-args", " ".join(TINY_EVAL),
               "--fit-args=--no-progress", "--workdir", tmp_path / "work", "--json", out]  # fmt: skip
    env = subprocess_env(FMNIST_ANCHOR_PYTHON=str(anchor_python))
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "training, per step" in result.stdout and "evaluation" in result.stdout
    data = json.loads(out.read_text())
    (round_,) = data["rounds"]
    assert round_["order"] == ["fmnist", "keras"] and round_["precision"] == "32-true"
    fmnist, keras = round_["fmnist"], round_["keras"]
    # The timer inside `fmnist fit` counted its steps after the first; the per-epoch figure is metrics.csv's.
    assert [e["steady_images"] for e in fmnist["steps"]] == [256]
    assert fmnist["epoch_images_per_s"] == pytest.approx(fmnist["epochs"][0]["images_per_s"], rel=1e-3)
    assert keras["anchor"]["precision"] == "float32" and keras["anchor"]["settings"]["limit_steps"] == 3
    for figure in ("step", "epoch", "eval"):
        ratio = fmnist[f"{figure}_images_per_s"] / keras[f"{figure}_images_per_s"]
        assert round_["ratios"][figure] == pytest.approx(ratio)
        assert data["summary"]["32-true"][figure]["ratio_median"] == pytest.approx(ratio)
    assert 0 <= fmnist["test_accuracy"] <= 1 and fmnist["provenance"]["resolved_precision"] == "32-true"
    assert data["environment"]["versions"]["torch"] and data["environment"]["versions"]["tensorflow"]
    # Issue 29's evaluation target needs the precision `auto` picks among those measured.
    assert (data["evaluation_target"] is not None) == (auto_precision(on_gpu=False)[0] == "32-true")
    assert (tmp_path / "work" / "round1-32-true" / "fmnist-run" / "metrics.csv").is_file()
