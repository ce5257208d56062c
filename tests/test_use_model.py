"""Using a trained model: `fmnist predict` on own images, `fmnist export`, and the HTML `fmnist report`."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist_lightning.checkpoints import load_classifier
from fmnist_lightning.data import CLASS_NAMES, FashionMNISTDataModule, to_float_images
from fmnist_lightning.inference import export_model, load_image, torchscript_logits
from fmnist_lightning.settings import DataSettings
from tests.helpers import best_ckpt, chromium_dom, is_png, need, without_module

SHIPPED = Path(__file__).parent / "data"  # ankle_boot.png: test image 0; pullover_on_white.png: test image 1
# Test images covering every class (the first three of each), written out as PNG files.
PER_CLASS = 3


@pytest.fixture(scope="module")
def test_images(real_data: None) -> tuple[torch.Tensor, torch.Tensor]:
    return FashionMNISTDataModule.from_settings(DataSettings(offline=True), eval_batch_size=250).split("test")


@pytest.fixture(scope="module")
def reported_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the run holding only what `fit` wrote, after `fmnist report` (which must therefore run
    `test` and `predict-samples`), and what it printed. Shared: the two test-set passes are the slow part."""
    from fmnist_lightning.cli import main

    run = tmp_path_factory.mktemp("reported") / "run"
    for name in ("config.yaml", "metrics.csv", "curves.png", "checkpoints/best.ckpt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained_run / name, run / name)
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout), redirect_stderr(stderr):
        patch.setenv("COLUMNS", "240")
        # fp32, as `predict` runs the model (`auto` may pick bf16-mixed on this CPU): the two must agree.
        argv = ["fmnist", "report", str(run), "--offline", "--accelerator", "cpu", "--precision", "32-true"]
        patch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 0, stderr.getvalue()
    return run, stdout.getvalue()


def test_own_images_are_predicted_as_fmnist_test_predicts_them(
    reported_run: tuple[Path, str], cli, tmp_path: Path, test_images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    run = reported_run[0]  # holds the predictions.csv `fmnist test` wrote
    images, labels = test_images
    chosen = [int(i) for k in range(len(CLASS_NAMES)) for i in (labels == k).nonzero().flatten()[:PER_CLASS]]
    for folder, pixels in (("dark", lambda a: a), ("light", lambda a: 255 - a)):
        (tmp_path / folder).mkdir()
        for i in chosen:
            Image.fromarray(pixels(images[i].numpy())).save(tmp_path / folder / f"{i:05d}.png")
    expected = {int(row["index"]): row for row in csv.DictReader((run / "predictions.csv").open())}

    # A small batch size: the 60 images go through the model in several batches.
    code, stdout, err = cli(
        "predict", "--ckpt", best_ckpt(run), "--accelerator", "cpu", "--eval-batch-size", "16", "--json",
        tmp_path / "dark", tmp_path / "light",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(stdout)
    assert len(rows) == 2 * len(chosen)
    for row in rows:
        want = expected[int(Path(row["file"]).stem)]
        assert row["top3"][0]["class"] == CLASS_NAMES[int(want["predicted"])], row["file"]
        for guess in row["top3"]:
            assert guess["probability"] == pytest.approx(float(want[f"p_{guess['class']}"]), abs=1e-4), row["file"]
        probabilities = [guess["probability"] for guess in row["top3"]]
        assert probabilities == sorted(probabilities, reverse=True)

    # Without inversion the light images are dark objects on white: not what the model was trained on.
    code, stdout, _ = cli("predict", "--ckpt", best_ckpt(run), "--json", "--no-invert", tmp_path / "light")
    assert code == 0
    assert [r["top3"] for r in json.loads(stdout)] != [r["top3"] for r in rows[len(chosen) :]]


def test_shipped_images_become_the_test_images_they_were_made_from(
    trained_run: Path, cli, test_images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images = test_images[0]
    assert is_png(SHIPPED / "ankle_boot.png") and is_png(SHIPPED / "pullover_on_white.png")
    # pullover_on_white.png is test image 1 inverted, enlarged 4x and placed off-centre on a
    # 200x160 white RGB canvas: cropping, scaling, centring and inversion must undo all of that.
    for name, index in (("ankle_boot.png", 0), ("pullover_on_white.png", 1)):
        assert torch.equal(load_image(SHIPPED / name), to_float_images(images[index : index + 1])[0]), name
    code, stdout, err = cli("predict", "--ckpt", best_ckpt(trained_run), SHIPPED)
    assert code == 0, err
    assert "ankle_boot.png" in stdout and "pullover_on_white.png" in stdout and "1st" in stdout


def test_object_is_fitted_into_28x28_keeping_its_aspect_ratio(tmp_path: Path) -> None:
    wide = np.full((90, 300), 240, np.uint8)  # a light-gray background
    wide[30:50, 20:220] = 10  # a dark 200x20 bar: 10:1, so 28x3 after scaling (rounded)
    Image.fromarray(wide).convert("RGB").save(tmp_path / "wide.jpg", quality=95)
    pixels = (load_image(tmp_path / "wide.jpg")[0] * 255).round()
    object_rows = (pixels > 128).any(dim=1).nonzero().flatten()
    assert object_rows.tolist() == [13, 14, 15]  # 3 rows, centred in 28 (the odd margin pixel above)
    assert bool((pixels[14] > 128).all())  # full width
    assert float(pixels[:10].max()) < 30  # the background became (nearly) black


def test_unreadable_files_are_reported_and_the_rest_predicted(trained_run: Path, cli, tmp_path: Path) -> None:
    shutil.copy(SHIPPED / "ankle_boot.png", tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("not an image")  # skipped in folders, an error when named
    (tmp_path / "fake.png").write_text("not an image either")
    (tmp_path / "truncated.png").write_bytes((SHIPPED / "pullover_on_white.png").read_bytes()[:200])
    (tmp_path / "empty").mkdir()
    code, stdout, err = cli(
        "predict", "--ckpt", best_ckpt(trained_run), tmp_path, tmp_path / "notes.txt", tmp_path / "missing.png",
        tmp_path / "empty",
    )  # fmt: skip
    assert code == 1
    errors = err.strip().splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors), err
    for name, reason in (
        ("fake.png", "not an image"),
        ("truncated.png", "unreadable image"),
        ("notes.txt", "not an image"),
        ("missing.png", "no such file"),
        ("empty", "no PNG or JPEG"),
    ):
        assert any(name in line and reason in line for line in errors), (name, err)
    assert "good.png" in stdout and "Ankle boot" in stdout


def test_huge_images_are_refused_from_their_header(trained_run: Path, cli, tmp_path: Path) -> None:
    from PIL import Image

    # 1-bit PNGs compress to a few KB: 144 megapixels (Pillow warns) and 400 (Pillow refuses).
    for name, side in (("big.png", 12000), ("bigger.png", 20000)):
        Image.new("1", (side, side)).save(tmp_path / name)
    shutil.copy(SHIPPED / "ankle_boot.png", tmp_path / "good.png")
    code, stdout, err = cli("predict", "--ckpt", best_ckpt(trained_run), tmp_path)
    assert code == 1
    errors = err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors), err
    assert "big.png: 12000x12000 is 144 megapixels, more than the 40 this tool reads; scale it down" in err
    assert "bigger.png: far more than the 40 megapixels this tool reads (Pillow refuses to open it)" in err
    assert "DecompressionBomb" not in err
    assert "good.png" in stdout and "Ankle boot" in stdout


def test_export_onnx_and_torchscript_agree_with_pytorch(
    copied_run: Path, cli, tmp_path: Path, test_images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    trained_run = copied_run  # the default output goes into the run folder
    need("onnxruntime", "export")
    import onnxruntime

    model = load_classifier(best_ckpt(trained_run))
    batch = to_float_images(test_images[0][-5:])  # images the export did not check: another batch size
    with torch.inference_mode():
        expected = model(batch).numpy()

    code, stdout, err = cli(
        "export", "--ckpt", best_ckpt(trained_run), "--format", "onnx", "--out", tmp_path / "m.onnx"
    )
    assert code == 0, err
    assert "checked against PyTorch with onnxruntime on 1000 test images" in stdout
    assert "output 'logits': float (batch, 10), the logits" in stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic, not the export sample's 2
    np.testing.assert_allclose(session.run(None, {"images": batch.numpy()})[0], expected, atol=1e-4)

    code, stdout, err = cli("export", "--ckpt", best_ckpt(trained_run), "--format", "torchscript")
    assert code == 0, err
    exported = trained_run / "model.torchscript.pt"  # the default: next to the checkpoint's run
    assert "checked against PyTorch with torch.jit.load" in stdout and exported.is_file()
    np.testing.assert_allclose(torchscript_logits(exported, batch).numpy(), expected, atol=1e-4)


def test_export_fails_when_the_exported_model_disagrees(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    from fmnist_lightning import inference
    from fmnist_lightning.errors import FmnistError

    real = inference.torchscript_logits
    monkeypatch.setattr(inference, "torchscript_logits", lambda path, images: real(path, images) + 0.01)
    images = to_float_images(test_images[0][:50])
    with pytest.raises(FmnistError, match="disagreed with the PyTorch model"):
        export_model(load_classifier(best_ckpt(trained_run)), "torchscript", tmp_path / "m.pt", images)
    assert not (tmp_path / "m.pt").exists()  # nobody can pick up a model that failed its check


def test_export_usage_errors_and_missing_extra(trained_run: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli("export", "--ckpt", best_ckpt(trained_run), "--format", "tflite")
    assert code == 2 and "--format must be one of onnx, torchscript" in err
    code, _, err = cli("export", "--ckpt", best_ckpt(trained_run), "--format", "onnx", "--out", trained_run)
    assert code == 2 and "is a folder" in err
    without_module(monkeypatch, "onnxscript")  # as if the 'export' extra were not installed
    code, _, err = cli("export", "--ckpt", best_ckpt(trained_run), "--format", "onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ONNX export needs the 'export' extra (onnxscript missing): pip install -e \".[export]\"" in err

    from fmnist_lightning.inference import onnx_logits

    without_module(monkeypatch, "onnxruntime")  # exporting still works; checking says it was skipped
    assert onnx_logits(Path("model.onnx"), torch.zeros(1, 1, 28, 28)) is None


def test_onnxruntime_engine_gives_the_report_of_the_torch_engine(
    reported_run: tuple[Path, str], cli, tmp_path: Path
) -> None:
    run = reported_run[0]  # holds the report.json and predictions.csv of the default torch engine
    code, _, err = cli("test", "--ckpt", best_ckpt(run), "--offline", "--eval-engine", "onnxruntime", "--out", tmp_path)
    assert code == 0, err
    torch_rows = list(csv.DictReader((run / "predictions.csv").open()))
    onnx_rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(onnx_rows) == len(torch_rows) == 10000
    assert [r["predicted"] for r in onnx_rows] == [r["predicted"] for r in torch_rows]
    probability_columns = [f"p_{name}" for name in CLASS_NAMES]
    worst = max(abs(float(a[c]) - float(b[c])) for a, b in zip(onnx_rows, torch_rows) for c in probability_columns)
    assert worst < 1e-4
    torch_report, onnx_report = (json.loads((d / "report.json").read_text()) for d in (run, tmp_path))
    assert onnx_report["accuracy"] == torch_report["accuracy"]
    assert onnx_report["confusion_matrix"] == torch_report["confusion_matrix"]
    assert onnx_report["loss"] == pytest.approx(torch_report["loss"], abs=1e-5)


def test_onnxruntime_engine_refuses_what_it_cannot_run(trained_run: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli(
        "test", "--ckpt", best_ckpt(trained_run), "--eval-engine", "onnxruntime", "--precision", "bf16-mixed"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--eval-engine onnxruntime runs fp32 on the CPU" in err
    code, _, err = cli("test", "--ckpt", best_ckpt(trained_run), "--eval-engine", "tensorrt")
    assert code == 2 and "--eval-engine" in err
    without_module(monkeypatch, "onnxruntime")  # as if the 'export' extra were not installed
    code, _, err = cli("test", "--ckpt", best_ckpt(trained_run), "--offline", "--eval-engine", "onnxruntime")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        "--eval-engine onnxruntime needs the 'export' extra (onnxruntime missing): pip install -e \".[export]\"" in err
    )


def _open_in_chromium(page: Path, tmp_path: Path) -> dict[str, int]:
    """Load the page in headless Chromium; a script added to a copy reports what the browser rendered."""
    check = """<script>
    window.addEventListener("load", () => {
      const images = [...document.images];
      const result = {
        images: images.length,
        loaded: images.filter((img) => img.complete && img.naturalWidth > 0).length,
        classes: document.querySelectorAll("#classification-report tbody.classes tr").length,
      };
      const out = document.createElement("pre");
      out.id = "result";
      out.textContent = JSON.stringify(result);
      document.body.append(out);
    });
    </script>"""
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", check + "</body>"))
    dom = chromium_dom(probe, tmp_path / "chromium-profile")
    start = dom.index('<pre id="result">') + len('<pre id="result">')  # not in the script's own text
    return json.loads(dom[start : dom.index("</pre>", start)])


def test_report_page_shows_every_image_and_the_report_table(
    reported_run: tuple[Path, str], cli, tmp_path: Path
) -> None:
    run, stdout = reported_run
    assert "Classification report" in stdout and "correct (9)" in stdout  # it ran test and predict-samples
    for name in ("report.json", "confusion_matrix.png", "correct.png", "incorrect.png"):
        assert (run / name).is_file(), name
    page = (run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4  # self-contained: nothing else is loaded
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "learning curves" in page.lower() and "batch_size" in page

    code, stdout, err = cli("report", run)  # fresh outputs: nothing is run again
    assert code == 0, err
    assert "Classification report" not in stdout and "report.html" in stdout
    assert _open_in_chromium(run / "report.html", tmp_path) == {"images": 4, "loaded": 4, "classes": 10}


def test_report_needs_a_run_folder(cli, tmp_path: Path) -> None:
    code, _, err = cli("report", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err
    (tmp_path / "config.yaml").write_text("max_epochs: 1\n")
    code, _, err = cli("report", tmp_path)
    assert code == 1 and "lacks metrics.csv, curves.png, report.json" in err
    assert not (tmp_path / "report.html").exists()


def test_report_remakes_outputs_older_than_the_checkpoint(tmp_path: Path) -> None:
    from fmnist_lightning.html_report import needs_update
    from fmnist_lightning.runs import TEST_FILES

    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"")
    assert needs_update(tmp_path, TEST_FILES, ckpt)  # missing
    for name in TEST_FILES:
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (1e9, 2e9))
    os.utime(ckpt, (1e9, 1e9))
    assert not needs_update(tmp_path, TEST_FILES, ckpt)
    os.utime(ckpt, (1e9, 3e9))  # e.g. `fit --resume` trained further
    assert needs_update(tmp_path, TEST_FILES, ckpt)
