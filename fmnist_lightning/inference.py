"""Using a trained model outside the test set: your own images, and exported ONNX / TorchScript files.

Own images are made to look like Fashion-MNIST before the model sees them, after the dataset's own
recipe (Xiao et al., 2017): grayscale, the object cropped from its background and scaled so its
longer side fills 28 pixels, centred, and inverted, because Fashion-MNIST shows light objects on
black while product photos show them on white.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist_lightning.checkpoints import load_classifier
from fmnist_lightning.data import CLASS_NAMES, IMAGE_SIZE, to_float_images
from fmnist_lightning.errors import FmnistError, UsageError, extra_hint, missing_modules, require_extra
from fmnist_lightning.hardware import resolve_hardware
from fmnist_lightning.model import FashionClassifier
from fmnist_lightning.runs import default_out_for
from fmnist_lightning.settings import DataSettings, HardwareSettings
from fmnist_lightning.sources import load_fashion_mnist

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a folder is searched for
MAX_MEGAPIXELS = 40  # larger images are refused (camera photos are mostly 12-24 megapixels)
# A pixel belongs to the object when it differs from the background by more than this (of 255).
OBJECT_THRESHOLD = 24
EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
EXPORT_EXTRA_HINT = extra_hint("export")
ONNX_EXPORTER = ("onnx", "onnxscript")  # what torch.onnx's exporter imports
ONNX_ENGINE = (*ONNX_EXPORTER, "onnxruntime")  # export, then run: `--eval-engine onnxruntime`
# Exported and PyTorch logits may differ by float rounding (other kernels, fused ops), not more.
EXPORT_TOLERANCE = 1e-3
CHECK_IMAGES = 1000  # test images the exported model is checked on


class ImageError(FmnistError):
    """One input image is missing, unreadable or not an image."""


# ---------------------------------------------------------------------------------------------
# Own images -> Fashion-MNIST style tensors


def image_paths(inputs: Sequence[Path]) -> tuple[list[Path], list[ImageError]]:
    """Files given directly, plus the PNG/JPEG files directly inside given folders (sorted)."""
    paths: list[Path] = []
    problems: list[ImageError] = []
    for item in inputs:
        if item.is_dir():
            try:
                found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as exc:
                problems.append(ImageError(f"{item}: cannot list the folder ({exc.strerror})"))
                continue
            if not found:
                problems.append(ImageError(f"{item}: folder holds no PNG or JPEG files"))
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            problems.append(ImageError(f"{item}: no such file or folder"))
    return paths, problems


ImageSource = Path | bytes  # a file, or an image file's bytes (an upload to `fmnist serve`)


def read_grayscale(source: ImageSource, name: str | None = None) -> np.ndarray:
    """The image as uint8 gray levels (H, W); transparent parts count as a white background.

    `source` is a file or the bytes of one (what `fmnist serve` receives); errors name it `name`
    (default: the path, or "the image" for bytes). Images over MAX_MEGAPIXELS are refused from their
    header alone (Image.open reads no pixels): decoding a 12000x12000 PNG takes gigabytes for a
    picture that ends up 28x28.
    """
    label = name or (str(source) if isinstance(source, Path) else "the image")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 megapixels on; we refuse well below that, in our own words.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with opened:
            width, height = opened.size
            if width * height > MAX_MEGAPIXELS * 1e6:
                raise ImageError(
                    f"{label}: {width}x{height} is {width * height / 1e6:.0f} megapixels, more than the "
                    f"{MAX_MEGAPIXELS} this tool reads; scale it down first"
                )
            image = ImageOps.exif_transpose(opened)  # photos taken sideways, as the camera meant them
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            return np.asarray(image.convert("L"))
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (Pillow cannot identify it)") from None
    except Image.DecompressionBombError:  # Pillow refuses to open it at all (over 179 megapixels)
        raise ImageError(
            f"{label}: far more than the {MAX_MEGAPIXELS} megapixels this tool reads (Pillow refuses to open it); "
            "scale it down first"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: unreadable image ({exc})") from None


def fashion_mnist_style(gray: np.ndarray, invert: bool = True) -> np.ndarray:
    """A uint8 (28, 28) image as Fashion-MNIST shows it: light object on black, filling the frame.

    With `invert`, an image whose border is mostly light is inverted. An image that already is
    28x28 is taken as a Fashion-MNIST image and is not cropped or scaled.
    """
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if invert and background > 127:
        gray, background = 255 - gray, 255 - background
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return gray
    rows, cols = np.nonzero(np.abs(gray.astype(np.int16) - background) > OBJECT_THRESHOLD)
    if rows.size:  # crop to the object; a blank image stays whole
        gray = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = gray.shape
    scale = IMAGE_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Area averaging when shrinking (no aliasing); bicubic when enlarging a small image.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    fitted = Image.fromarray(gray).resize(size, resample)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), round(background))
    # Centred; an odd margin puts the extra pixel before the object, as Fashion-MNIST does.
    canvas.paste(fitted, ((IMAGE_SIZE - size[0] + 1) // 2, (IMAGE_SIZE - size[1] + 1) // 2))
    return np.asarray(canvas)


def model_pixels(source: ImageSource, invert: bool = True, name: str | None = None) -> np.ndarray:
    """An image file (or its bytes) as the model sees it: uint8 (28, 28), Fashion-MNIST style.
    The one preprocessing of `fmnist predict` and `fmnist serve`."""
    return fashion_mnist_style(read_grayscale(source, name), invert)


def pixels_to_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (28, 28) -> the model's input, float (1, 28, 28) in [0, 1]."""
    return to_float_images(torch.from_numpy(pixels.copy()).unsqueeze(0))[0]


def load_image(source: ImageSource, invert: bool = True, name: str | None = None) -> torch.Tensor:
    """One image file (or its bytes) as the model's input: float (1, 28, 28) in [0, 1]."""
    return pixels_to_input(model_pixels(source, invert, name))


def class_probabilities(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities (B, 10) on the CPU, in fp32, for inputs (B, 1, 28, 28) on the model's device."""
    with torch.inference_mode():
        return model(batch).float().softmax(dim=1).cpu()


# ---------------------------------------------------------------------------------------------
# Prediction


@dataclass
class Prediction:
    path: Path
    probabilities: torch.Tensor  # (10,)

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        values, classes = self.probabilities.topk(k)
        return [(CLASS_NAMES[c], float(v)) for v, c in zip(values.tolist(), classes.tolist())]


def predict_images(
    model: FashionClassifier, paths: Sequence[Path], device: torch.device, batch_size: int, invert: bool = True
) -> Iterator[Prediction | ImageError]:
    """A Prediction per readable image and an ImageError per unreadable one, in the order given."""
    model = model.to(device).eval()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        outcomes: list[Prediction | ImageError | None] = []
        images: dict[int, torch.Tensor] = {}  # position in chunk -> image
        for position, path in enumerate(chunk):
            try:
                images[position] = load_image(path, invert)
                outcomes.append(None)  # filled in after the batch ran
            except ImageError as exc:
                outcomes.append(exc)
        if images:
            probabilities = class_probabilities(model, torch.stack(list(images.values())).to(device))
            for position, p in zip(images, probabilities):
                outcomes[position] = Prediction(chunk[position], p)
        yield from (outcome for outcome in outcomes if outcome is not None)


def classify(
    ckpt: Path, inputs: Sequence[Path], hardware: HardwareSettings, batch_size: int, invert: bool = True
) -> tuple[list[Prediction], list[ImageError]]:
    """What `fmnist predict` does: the class probabilities of every readable image (files, and
    the images directly inside folders), and one problem per input that could not be read; in
    batches of `batch_size`, on the first GPU when `hardware` resolves to one."""
    device = torch.device("cuda" if resolve_hardware(hardware).on_gpu else "cpu")
    model = load_classifier(ckpt)
    paths, problems = image_paths(inputs)
    predictions: list[Prediction] = []
    for outcome in predict_images(model, paths, device, batch_size, invert):
        if isinstance(outcome, Prediction):
            predictions.append(outcome)
        else:
            problems.append(outcome)
    return predictions, problems


def predictions_json(predictions: Sequence[Prediction]) -> str:
    """What `fmnist predict --json` prints: each file with its top 3 classes and their probabilities."""
    listed = [
        {"file": str(p.path), "top3": [{"class": c, "probability": round(v, 6)} for c, v in p.top(3)]}
        for p in predictions
    ]
    return json.dumps(listed, indent=2)


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    path: Path
    runtime: str  # what ran the exported file to check it
    max_abs_diff: float | None  # None: not checked (onnxruntime not installed)
    checked_images: int


def export_onnx(model: torch.nn.Module, sample: torch.Tensor, path: Path) -> None:
    """ONNX with input `images` (batch, 1, 28, 28) and output `logits` (batch, 10); any batch size."""
    require_extra("export", ONNX_EXPORTER, "ONNX export")
    # The exporter's graph passes log each step at INFO, which the CLI shows: keep them to warnings.
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=True,
            verbose=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            external_data=False,  # one self-contained file
        )
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_torchscript(model: FashionClassifier, sample: torch.Tensor, path: Path) -> None:
    """A traced TorchScript module: logits for any batch size (the network has no data-dependent branches)."""
    with warnings.catch_warnings():
        # Tracing probes every attribute of the module; torchmetrics and torch.jit then warn about
        # their own deprecations, which say nothing about the exported file.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = model.to_torchscript(method="trace", example_inputs=sample)
        torch.jit.save(traced, str(path))


def onnxruntime_session(path: Path) -> Any:
    """An onnxruntime CPU session with PyTorch's thread count."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(path: Path, images: torch.Tensor) -> torch.Tensor | None:
    """Run an exported ONNX file with onnxruntime; None when onnxruntime is not installed."""
    if missing_modules(("onnxruntime",)):
        return None
    return session_logits(onnxruntime_session(path), images)


def session_logits(session: Any, images: torch.Tensor) -> torch.Tensor:
    """Logits from an onnxruntime session of an exported network, for images (batch, 1, 28, 28)."""
    inputs = {"images": images.detach().cpu().float().contiguous().numpy()}
    return torch.from_numpy(session.run(["logits"], inputs)[0])


class OnnxRuntimeNet(torch.nn.Module):
    """A network exported to ONNX and run by onnxruntime on the CPU, in place of the PyTorch
    network for inference (`--eval-engine onnxruntime`). onnxruntime runs the convolutions and
    pools in a blocked memory layout (NCHWc) and fuses the dense layer with its ReLU, which
    PyTorch's eager mode cannot do (`fmnist bench --paths raw,fmnist-fast` measures what it gains
    on a machine)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        require_extra("export", ONNX_ENGINE, "--eval-engine onnxruntime")
        with tempfile.TemporaryDirectory(prefix="fmnist-onnx-") as tmp:
            path = Path(tmp) / "net.onnx"
            export_onnx(net.cpu().eval(), torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE), path)
            self.session = onnxruntime_session(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return session_logits(self.session, x)


def torchscript_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's own deprecation notice
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(images)


def export_model(model: FashionClassifier, fmt: str, path: Path, check_images: torch.Tensor) -> ExportResult:
    """Export to `fmt` (a key of EXPORT_FORMATS), then compare the exported file with PyTorch on
    `check_images`: one image alone, then all in one batch, so the batch dimension is shown to be
    dynamic. A file that disagrees is removed and FmnistError raised."""
    export, run, runtime = {
        "onnx": (export_onnx, onnx_logits, "onnxruntime"),
        "torchscript": (export_torchscript, torchscript_logits, "torch.jit.load"),
    }[fmt]
    model = model.cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    export(model, check_images[:2], path)  # a sample batch of 2: with 1, the batch size would be fixed
    with torch.inference_mode():
        expected = model(check_images)
    single, full = run(path, check_images[:1]), run(path, check_images)
    if single is None or full is None:
        return ExportResult(path, runtime, None, 0)
    diff = max(float((single - expected[:1]).abs().max()), float((full - expected).abs().max()))
    if not diff <= EXPORT_TOLERANCE:  # also catches NaN
        path.unlink()
        raise FmnistError(
            f"the exported model disagreed with the PyTorch model (max |logit difference| {diff:.3g} over "
            f"{len(check_images)} test images with {runtime}, tolerance {EXPORT_TOLERANCE:g}); removed {path}"
        )
    return ExportResult(path, runtime, diff, len(check_images))


def export_checkpoint(ckpt: Path, fmt: str, out: Path | None, data: DataSettings) -> ExportResult:
    """What `fmnist export` does: the checkpoint's network as `fmt`, written to `out` (default: the
    run folder) and checked against PyTorch on the first test images (read from `data`)."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    path = out or default_out_for(ckpt) / EXPORT_FORMATS[fmt]
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give the file to write, e.g. {path / EXPORT_FORMATS[fmt]}")
    model = load_classifier(ckpt)
    test_images = load_fashion_mnist(Path(data.data_dir), offline=data.offline).test_images[:CHECK_IMAGES]
    return export_model(model, fmt, path, to_float_images(test_images))
