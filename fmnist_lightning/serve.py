"""`fmnist serve`: the trained model behind HTTP, on LitServe, and a web page to try it.

    POST /predict   an image (raw image/png or image/jpeg body, a multipart upload, or JSON
                    {"image": BASE64}) -> {"class_index", "class_name", "probability"}; `?top_k=K`
                    adds the K most likely classes (10: all), `?input=1` the 28x28 image the model saw
    GET  /health    200 "ok" once the model is loaded (503 "not ready" before)
    GET  /          the page (serve_page.html): drop, choose or draw an image

Where the work happens. LitServe runs an HTTP process (uvicorn, FastAPI) and inference worker
processes. The HTTP process checks the API key, reads the body (bounded by --max-upload-mb) and
turns it into the 28x28 input with `inference.model_pixels`, the one preprocessing of `fmnist
predict`; a request that cannot become an image is answered there with a 4xx and never reaches a
worker. (In LitServe's batched loop one request that fails in a worker fails its whole batch, so
a bad upload would take good ones with it.) Workers receive 784 bytes per request, batch up to
--max-batch-size requests arriving within --batch-timeout seconds, and run the network
(`inference.class_probabilities`, as `predict` does) with PyTorch or ONNX Runtime.
"""

# No `from __future__ import annotations`: LitServe and FastAPI read decode_request's and
# authorize's annotations (FastAPI dependencies) as objects.
import base64
import binascii
import io
import json
import logging
import os
import signal
import threading
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from fmnist_lightning.data import CLASS_NAMES, IMAGE_SIZE
from fmnist_lightning.inference import ImageError, class_probabilities, model_pixels, pixels_to_input
from fmnist_lightning.settings import ServeSettings

log = logging.getLogger("fmnist_lightning.serve")

API_KEY_ENV = "FMNIST_SERVE_API_KEY"
IMAGE_TYPES = ("image/png", "image/jpeg")
# Concurrent image decodes in the HTTP process: each may hold a 40-megapixel image (~160 MB).
DECODE_SLOTS = 4


class ServeOptions(ServeSettings):
    """What `fmnist serve` runs: the serve settings (where it listens, the engine, batching,
    limits), the checkpoint, and the device the hardware settings resolved to."""

    ckpt: Path
    accelerator: Literal["cpu", "cuda"] = "cpu"  # cuda runs the torch engine on the first GPU


# ---------------------------------------------------------------------------------------------
# The HTTP process: key, body, preprocessing


def refuse(status: int, sentence: str) -> HTTPException:
    return HTTPException(status_code=status, detail=sentence)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    too_large = refuse(413, f"The upload is larger than the server's limit of {limit / 1e6:g} MB.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette's form parser reads the body from here  # noqa: SLF001
    return body


def _top_k(value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = -1
    if not 0 <= k <= len(CLASS_NAMES):
        raise refuse(400, f"top_k must be a whole number from 0 to {len(CLASS_NAMES)}, got {value!r}.")
    return k


async def read_image_request(request: Request) -> dict[str, Any]:
    """A FastAPI dependency: the request's image as the model's 28x28 uint8 input (bytes), or a 4xx.

    Raw image/png or image/jpeg bodies, multipart/form-data with a file field `image` (or the
    first file), or JSON {"image": BASE64, "top_k": K}."""
    options: ServeOptions = request.app.state.fmnist_options
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in (*IMAGE_TYPES, "multipart/form-data", "application/json"):
        raise refuse(
            415,
            f"Content type {kind or 'none'!r} is not accepted; send image/png, image/jpeg, "
            "multipart/form-data or application/json.",
        )
    body = await _body(request, int(options.max_upload_mb * 1e6))
    if not body:
        raise refuse(400, "The request body is empty; send a PNG or JPEG image.")
    top_k = _top_k(request.query_params.get("top_k", 0))
    with_input = request.query_params.get("input", "") in ("1", "true")
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=10)
        except Exception:  # starlette's MultiPartException and parser errors: all mean a malformed form
            raise refuse(400, "The multipart form could not be parsed.") from None
        files = [v for v in form.values() if hasattr(v, "read")]
        upload = form.get("image") if hasattr(form.get("image"), "read") else (files[0] if files else None)
        if upload is None:
            raise refuse(400, "The multipart form holds no file; send the image in a field named 'image'.")
        image = await upload.read()  # type: ignore[union-attr]
        if "top_k" in form:
            top_k = _top_k(form["top_k"])
    elif kind == "application/json":
        try:
            document = json.loads(body)
            image = base64.b64decode(document["image"], validate=True)
        except (ValueError, UnicodeDecodeError):
            raise refuse(400, "The JSON body is not valid JSON with a base64 string in 'image'.") from None
        except (KeyError, TypeError):
            raise refuse(400, 'The JSON body needs the image as a base64 string in "image".') from None
        except binascii.Error:
            raise refuse(400, "The 'image' field is not valid base64.") from None
        if "top_k" in document:
            top_k = _top_k(document["top_k"])
    else:
        image = body
    if not image:
        raise refuse(400, "The image is empty; send a PNG or JPEG image.")
    limiter = request.app.state.fmnist_decode_slots
    try:
        pixels = await anyio.to_thread.run_sync(model_pixels, image, options.invert, "the upload", limiter=limiter)
    except ImageError as exc:
        status = 413 if "megapixels" in str(exc) else 400
        raise refuse(status, f"{str(exc)[0].upper()}{str(exc)[1:]}.") from None
    return {"pixels": pixels.tobytes(), "top_k": top_k, "input": with_input}


def check_key(request: Request, expected: str | None) -> None:
    """401 unless the request carries the expected X-API-Key (nothing to check without a key)."""
    if expected is not None and request.headers.get("x-api-key") != expected:
        missing = "x-api-key" not in request.headers
        raise refuse(401, "This server needs an API key in the X-API-Key header." if missing else "Wrong API key.")


# ---------------------------------------------------------------------------------------------
# The inference worker: batches of 28x28 inputs through the network


def _class(index: int, probability: float) -> dict[str, Any]:
    return {"class_index": index, "class_name": CLASS_NAMES[index], "probability": round(probability, 6)}


def input_png(pixels: np.ndarray) -> str:
    """The 28x28 input as a data: URL of a PNG (what the page shows as 'what the model saw')."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def encode_prediction(probabilities: torch.Tensor, top_k: int, pixels: np.ndarray | None) -> dict[str, Any]:
    """The answer to one request: the class, its probability, the top_k classes, the input."""
    values = probabilities.tolist()
    best = int(probabilities.argmax())
    answer = _class(best, values[best])
    if top_k:
        order = sorted(range(len(values)), key=lambda c: -values[c])[:top_k]
        answer["top_k"] = [_class(c, values[c]) for c in order]
    if pixels is not None:
        answer["input"] = input_png(pixels)
    return answer


def load_serving_model(options: ServeOptions) -> torch.nn.Module:
    """The checkpoint's model as `predict` loads it, channels_last, on the engine asked for."""
    from fmnist_lightning.checkpoints import load_classifier
    from fmnist_lightning.inference import OnnxRuntimeNet

    model = load_classifier(options.ckpt).to_channels_last()
    if options.engine == "onnxruntime":
        model.net = OnnxRuntimeNet(model.net)
        torch.set_num_threads(1)  # as `test --eval-engine onnxruntime`: no torch threads spinning beside it
    return model.to(options.accelerator).eval()


class FashionAPI(ls.LitAPI):
    """LitServe's view of the model. Runs in each inference worker process."""

    def __init__(self, options: ServeOptions) -> None:
        super().__init__(max_batch_size=options.max_batch_size, batch_timeout=options.batch_timeout)
        self.options = options

    def authorize(self, request: Request) -> None:
        """LitServe's auth hook: a dependency of /predict, /health and /info."""
        check_key(request, self.options.api_key)

    def setup(self, device: str) -> None:
        # Ctrl-C reaches every process of the terminal's group: the main process stops the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # One thread per worker: the HTTP process decodes images on the other cores. Two torch threads
        # on a 2-core machine spin-wait against it (measured: 602 req/s with 32 clients and a p99 of
        # several hundred ms, against 800+ req/s with one thread).
        torch.set_num_threads(1)
        self.model = load_serving_model(self.options)

    def decode_request(self, request: Annotated[dict, Depends(read_image_request)], context: dict) -> torch.Tensor:
        pixels = np.frombuffer(request["pixels"], dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
        context["top_k"], context["pixels"] = request["top_k"], pixels if request["input"] else None
        return pixels_to_input(pixels)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor, context: Any) -> torch.Tensor:
        batch = x if x.dim() == 4 else x.unsqueeze(0)  # unbatched (max_batch_size 1): one (1, 28, 28) input
        probabilities = class_probabilities(self.model, batch.to(self.options.accelerator))
        return probabilities if x.dim() == 4 else probabilities[0]

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor, context: dict) -> dict[str, Any]:
        return encode_prediction(output, context["top_k"], context["pixels"])


# ---------------------------------------------------------------------------------------------
# The server


def page() -> str:
    """The page, with the class names filled in."""
    html = resources.files("fmnist_lightning").joinpath("serve_page.html").read_text(encoding="utf-8")
    return html.replace("/*CLASS_NAMES*/[]", json.dumps(list(CLASS_NAMES)))


def build_server(options: ServeOptions) -> ls.LitServer:
    """The LitServer for `options`, with the page at / and errors as {"detail": one sentence}."""
    api = FashionAPI(options)
    server = ls.LitServer(
        api,
        accelerator="cuda" if options.accelerator.startswith("cuda") else "cpu",
        devices=1,
        workers_per_device=options.workers,
        timeout=30,
        disable_openapi_url=True,
    )
    app = server.app
    app.state.fmnist_options = options
    app.state.fmnist_decode_slots = anyio.CapacityLimiter(DECODE_SLOTS)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]
    html = page()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:  # the page itself holds no data: it asks for the key when needed
        return HTMLResponse(html)

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> JSONResponse:
        client = request.client.host if request.client else "?"
        log.warning(
            "refused %s %s from %s: %d %s", request.method, request.url.path, client, exc.status_code, exc.detail
        )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return server


def run_server(options: ServeOptions) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop the HTTP and worker processes and return."""
    server = build_server(options)

    main_pid = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child (LitServe's manager) inherited this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # The main thread is waiting on the manager's shutdown event; a fresh thread (its own
        # connection to the manager) sets it, and LitServe's normal shutdown follows.
        log.info("stopping (%s)", signal.Signals(signum).name)
        if server._shutdown_event is not None:  # noqa: SLF001
            threading.Thread(target=server._shutdown_event.set, daemon=True).start()  # noqa: SLF001
        else:  # still starting: no event to set yet
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(
            host=options.host,
            port=options.port,
            num_api_servers=options.workers,
            log_level="warning",
            generate_client_file=False,
            access_log=False,
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
