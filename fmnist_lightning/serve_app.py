"""The LitServe application behind `fmnist serve`: the trained model behind HTTP, and a web page to try it.

    POST /predict   an image (raw image/png or image/jpeg body, a multipart upload, or JSON
                    {"image": BASE64}) -> {"class_index", "class_name", "probability"}; `?top_k=K`
                    adds the K most likely classes (10: all), `?input=1` the 28x28 image the model saw
    GET  /health    200 "ok" once the model is loaded (503 "not ready" before); never needs the key
    GET  /          the page (serve_page.html): drop, choose or draw an image; never needs the key

Where the work happens. LitServe runs an HTTP process (uvicorn, FastAPI) and inference worker
processes. The HTTP process checks the API key, reads the body (bounded by --max-upload-mb) and
turns it into the 28x28 input with `inference.model_pixels`, the one preprocessing of `fmnist
predict`; a request that cannot become an image is answered there with a 4xx and never reaches a
worker. (In LitServe's batched loop one request that fails in a worker fails its whole batch, so
a bad upload would take good ones with it.) Workers receive 784 bytes per request, batch up to
--max-batch-size requests arriving within --batch-timeout seconds, and run the network
(`inference.class_probabilities`, as `predict` does) with PyTorch or ONNX Runtime.

LitServe's public API (its parameters, middlewares, the auth hook, a loop subclass), with two
details of its own that it does not promise: the shutdown event a signal sets (`stop_on_signals`),
and how its batched loop reads the request queue (`_FirstReadWaits`). pyproject pins the LitServe
versions this was tested with, and tests/test_serve.py fails when either changes.
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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fmnist_lightning.data import CLASS_NAMES, IMAGE_SIZE
from fmnist_lightning.inference import ImageError, class_probabilities, model_pixels, pixels_to_input
from fmnist_lightning.settings import ServeSettings

log = logging.getLogger("fmnist_lightning.serve")

IMAGE_TYPES = ("image/png", "image/jpeg")
# Concurrent image decodes in the HTTP process: each may hold a 40-megapixel image (~160 MB).
DECODE_SLOTS = 4
# Open without the key: probes and load balancers check health without application keys.
HEALTH_PATH = "/health"
# How long an idle inference worker blocks on its queue before it looks again (LitServe's unbatched
# loop waits as long).
IDLE_WAIT_S = 1.0


class ServeOptions(ServeSettings):
    """What `fmnist serve` runs: the serve settings (where it listens, the engine, batching,
    limits), the checkpoint, and the device the hardware settings resolved to."""

    ckpt: Path
    accelerator: Literal["cpu", "cuda"] = "cpu"  # cuda runs the torch engine on the first GPU


# ---------------------------------------------------------------------------------------------
# The HTTP process: key, body, preprocessing


def refuse(status: int, sentence: str) -> HTTPException:
    return HTTPException(status_code=status, detail=sentence)


class UploadLimit:
    """ASGI middleware: a request body over `limit` bytes is refused (413) when it is read, from its
    Content-Length or as soon as that many bytes came, so the rest is never held in memory.

    (LitServe's `max_payload_size` reads up to the limit and answers "Payload too large" without
    saying the limit; this says it in one sentence, as every other refusal does.)"""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large, received = declared.isdigit() and int(declared) > self.limit, 0

        async def bounded() -> Message:
            nonlocal received
            if not too_large:
                message = await receive()
                received += len(message.get("body", b""))
                if received <= self.limit:
                    return message
            raise refuse(413, f"The upload is larger than the server's limit of {self.limit / 1e6:g} MB.")

        await self.app(scope, bounded, send)


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
    body = await request.body()  # bounded by UploadLimit; kept by starlette for `request.form()`
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


class _FirstReadWaits:
    """The request queue as LitServe's batched loop reads it while it gathers one batch: the first
    read blocks until a request comes (up to IDLE_WAIT_S), later reads are as the loop asks.

    LitServe reads its queue with a 1 ms timeout until the batch window closes, again and again: on
    the manager's queue each read is a round trip to another process, which cost an idle server 15%
    of a core. Waiting for the first request keeps batching as it was (requests that come while a
    batch gathers join it) and runs a request that finds the worker idle at once."""

    def __init__(self, queue: Any) -> None:
        self.queue, self.first = queue, True

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if self.first:
            self.first = False
            return self.queue.get(timeout=IDLE_WAIT_S)
        return self.queue.get(block, timeout)

    def get_nowait(self) -> Any:
        return self.get(block=False)


class WaitingBatchedLoop(ls.loops.BatchedLoop):
    """LitServe's batched loop, waiting for requests instead of polling for them."""

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Any, transport: Any) -> tuple[list, list]:
        return super().get_batch_requests(lit_api, _FirstReadWaits(request_queue), transport)


class FashionAPI(ls.LitAPI):
    """LitServe's view of the model. Runs in each inference worker process."""

    def __init__(self, options: ServeOptions) -> None:
        batching = options.max_batch_size > 1  # unbatched, LitServe's own loop already waits for requests
        super().__init__(
            max_batch_size=options.max_batch_size,
            batch_timeout=options.batch_timeout,
            loop=WaitingBatchedLoop() if batching else "auto",
        )
        self.options = options

    def authorize(self, request: Request) -> None:
        """LitServe's auth hook, a dependency of its routes: the key, except for /health."""
        if request.url.path != HEALTH_PATH:
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


class ServePage:
    """ASGI middleware: GET / answers the page, before LitServe's own `/` route ("litserve running").
    The page holds no data and needs no key: it asks for one when the server answers 401."""

    def __init__(self, app: ASGIApp, html: str) -> None:
        self.app, self.html = app, html

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] == "GET":
            return await HTMLResponse(self.html)(scope, receive, send)
        await self.app(scope, receive, send)


def build_server(options: ServeOptions) -> ls.LitServer:
    """The LitServer for `options`, with the page at / and errors as {"detail": one sentence}."""
    server = ls.LitServer(
        FashionAPI(options),
        accelerator="cuda" if options.accelerator.startswith("cuda") else "cpu",
        devices=1,
        workers_per_device=options.workers,
        timeout=30,
        healthcheck_path=HEALTH_PATH,
        disable_openapi_url=True,
        middlewares=[(ServePage, {"html": page()}), (UploadLimit, {"limit": int(options.max_upload_mb * 1e6)})],
    )
    app = server.app
    app.state.fmnist_options = options
    app.state.fmnist_decode_slots = anyio.CapacityLimiter(DECODE_SLOTS)

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> JSONResponse:
        client = request.client.host if request.client else "?"
        log.warning(
            "refused %s %s from %s: %d %s", request.method, request.url.path, client, exc.status_code, exc.detail
        )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return server


def stop_on_signals(server: ls.LitServer) -> dict[int, Any]:
    """Make Ctrl-C and SIGTERM stop `server` as its shutdown API would; returns the handlers replaced.

    LitServe's own Ctrl-C path (a KeyboardInterrupt in its main loop) leaves its worker monitor
    running: it may find the stopped workers and shut down a second time, or log a traceback. Setting
    the shutdown event, as LitServe's /shutdown route does, stops the monitor first. That event is
    private (`_shutdown_event`): pinned and tested."""
    main_pid = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child (LitServe's manager) inherited this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info("stopping (%s)", signal.Signals(signum).name)
        event = server._shutdown_event  # noqa: SLF001
        if event is None:  # still starting: no event to set yet
            raise KeyboardInterrupt
        # The main thread is waiting on the manager's event; a fresh thread (its own connection to
        # the manager) sets it, and LitServe's normal shutdown follows.
        threading.Thread(target=event.set, daemon=True).start()

    return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}


def run_server(options: ServeOptions) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop the HTTP and worker processes and return."""
    server = build_server(options)
    previous = stop_on_signals(server)
    try:
        server.run(
            host=options.host,
            port=options.port,
            num_api_servers=options.api_servers,
            log_level="warning",
            generate_client_file=False,
            access_log=False,
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        # LitServe's worker monitor (a daemon thread that looks every 2 s) may wake after run() shut
        # the manager down, and log the lost connection as a traceback before the process exits.
        # Whatever LitServe logs once run() has returned is no news.
        logging.getLogger("litserve").setLevel(logging.CRITICAL + 1)
