"""The anchor for `fmnist serve`'s load figures: a bare FastAPI endpoint, one uvicorn process.

    python scripts/serve_anchor.py --ckpt runs/001/checkpoints/best.ckpt --port 8001

POST /predict reads and preprocesses the request exactly as `fmnist serve` does (the same FastAPI
dependency, `serve_app.read_image_request`, behind the same upload limit) and runs the same model
the same way (`serve_app.load_serving_model`, `inference.class_probabilities`,
`serve_app.encode_prediction`), but in the HTTP process itself, one request at a time: no LitServe,
no worker process, no batching. Listens on 127.0.0.1 only. scripts/serve_load.py measures both;
docs/using-the-model.md has the table.
"""

import argparse
from pathlib import Path
from typing import Annotated, Any

import anyio
import numpy as np
import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse

from fmnist_lightning.inference import class_probabilities, pixels_to_input
from fmnist_lightning.serve_app import (
    DECODE_SLOTS,
    ServeOptions,
    UploadLimit,
    encode_prediction,
    load_serving_model,
    read_image_request,
)


def anchor_app(options: ServeOptions) -> FastAPI:
    torch.set_num_threads(1)  # requests run one at a time in a thread; as many threads as serve's workers get
    model = load_serving_model(options)
    app = FastAPI(openapi_url=None)
    app.state.fmnist_options = options
    app.state.fmnist_decode_slots = anyio.CapacityLimiter(DECODE_SLOTS)
    app.add_middleware(UploadLimit, limit=int(options.max_upload_mb * 1e6))

    @app.post("/predict")
    def predict(request: Annotated[dict, Depends(read_image_request)]) -> Any:
        pixels = np.frombuffer(request["pixels"], dtype=np.uint8).reshape(28, 28)
        probabilities = class_probabilities(model, pixels_to_input(pixels).unsqueeze(0))[0]
        return encode_prediction(probabilities, request["top_k"], pixels if request["input"] else None)

    @app.exception_handler(HTTPException)
    async def refused(request: Any, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A bare FastAPI endpoint over the model (the load anchor).")
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--engine", choices=("torch", "onnxruntime"), default="torch")
    args = parser.parse_args()
    app = anchor_app(ServeOptions(ckpt=args.ckpt, engine=args.engine))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
