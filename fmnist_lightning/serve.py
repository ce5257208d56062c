"""`fmnist serve`: the checks before the server starts, then the server (serve_app.py).

This module imports neither LitServe nor torch: a missing 'serve' extra is one line, not an
ImportError, and a wrong --ckpt is one line here rather than a failed worker process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist_lightning.errors import require_extra
from fmnist_lightning.settings import ServeRun

if TYPE_CHECKING:
    from fmnist_lightning.serve_app import ServeOptions

API_KEY_ENV = "FMNIST_SERVE_API_KEY"


def serve_options(ckpt: Path, settings: ServeRun) -> ServeOptions:
    """What the server will run: the extras it needs checked, the checkpoint read, the device
    resolved (a GPU only for the torch engine) and the API key (--api-key, else $FMNIST_SERVE_API_KEY)."""
    serving = settings.serve
    require_extra("serve", ("litserve", "multipart"), "fmnist serve")
    from fmnist_lightning.inference import ONNX_ENGINE

    if serving.engine == "onnxruntime":
        require_extra("export", ONNX_ENGINE, "--engine onnxruntime")
    from fmnist_lightning.checkpoints import read_checkpoint
    from fmnist_lightning.hardware import resolve_hardware
    from fmnist_lightning.serve_app import ServeOptions

    read_checkpoint(ckpt)
    on_gpu = resolve_hardware(settings.hardware).on_gpu and serving.engine == "torch"
    return ServeOptions(
        **{**dict(serving), "api_key": serving.api_key or os.environ.get(API_KEY_ENV) or None},
        ckpt=ckpt,
        accelerator="cuda" if on_gpu else "cpu",
    )


def serve_checkpoint(ckpt: Path, settings: ServeRun, announce: Callable[[ServeOptions], None]) -> None:
    """Serve `ckpt` as `settings` say until Ctrl-C or SIGTERM; `announce` is told what is served
    once everything is checked, before the server starts."""
    options = serve_options(ckpt, settings)
    announce(options)
    from fmnist_lightning.serve_app import run_server

    run_server(options)
