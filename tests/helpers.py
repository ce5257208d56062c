"""Helpers shared by the tests (fixtures live in conftest.py).

A test that needs what a machine may lack (an extra, a program, the dataset) skips without it; under
CI every skip fails the run (conftest.py), so CI checks that everything is there."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest
from lightning.pytorch.callbacks import Callback

from fmnist_lightning.errors import extra_hint
from fmnist_lightning.settings import Settings


def is_png(path: Path) -> bool:
    from PIL import Image

    if not path.is_file() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    with Image.open(path) as image:
        image.verify()
    return True


def tiny_settings(**changes: Any) -> Settings:
    """A run of a few seconds on the CPU with the real data: two short epochs, no progress bar."""
    base = dict(max_epochs=2, limit_train_batches=30, limit_val_batches=2, offline=True, progress=False)
    return Settings(**{**base, "accelerator": "cpu", **changes})


def classifier(input_mean: float = 0.0, input_std: float = 1.0, **settings: Any) -> Any:
    """A FashionClassifier built as `fmnist fit` builds it, from settings (defaults unless given)."""
    from fmnist_lightning.model import FashionClassifier

    s = Settings(**settings)
    return FashionClassifier.from_settings(s.model, s.optimisation, input_mean, input_std)


ROOT = Path(__file__).resolve().parents[1]

# A fit in seconds on the real data, for the tests of what surrounds training rather than of the
# learning. TINY_FIT for the launchers: they choose the accelerator, and validate in full (they check
# that every validation image is seen once). TINY_CPU on the CPU, with one validation batch; TINY is
# the same as settings. A test that needs more gives the option again: the last one wins.
TINY_FIT = ["--offline", "--no-progress", "--max-epochs", "1", "--limit-train-batches", "4"]
TINY_CPU = [*TINY_FIT, "--accelerator", "cpu", "--limit-val-batches", "1"]
TINY = dict(accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=1, offline=True, progress=False)


def best_ckpt(run: Path) -> Path:
    return run / "checkpoints" / "best.ckpt"


def launcher_env(**extra: str) -> dict[str, str]:
    """A clean environment for a launched process: this Python's bin first on PATH (torchrun, fmnist),
    this checkout's package first on the import path, one thread per process (two processes share
    two cores here), and nothing inherited that could steer Lightning (no SLURM_* or RANK)."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    return env | extra


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(module: str, extra: str) -> None:
    """Skip unless `module` is installed: it comes with the project's `extra`, or with the `test`
    dependency group."""
    if importlib.util.find_spec(module) is None:
        how = "pip install --group test" if extra == "test" else extra_hint(extra)
        pytest.skip(f"{module} is not installed: {how}")


def need_program(name: str, package: str) -> str:
    """The path of the program `name`; skip without it (Debian's `package` has it)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: apt-get install {package}")
    return path


def without_module(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """As if the optional package `name` were not installed: importing it fails, and so does
    importlib.util.find_spec, the project's check for an extra (errors.py)."""
    monkeypatch.setitem(sys.modules, name, None)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for an `fmnist` subprocess: this checkout's package, a wide terminal."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


def pause_env(folder: Path, step: int) -> dict[str, str]:
    """The environment in which every process of a launched run pauses at the end of `step`, until
    a signal reaches it or `folder/go` exists (tests/pausing.py). It replaces PYTHONPATH: this
    checkout first, then the folder that registers the pause as a Lightning entry point."""
    from tests.pausing import VARIABLE

    plugin = folder / "entry-point"
    info = plugin / "fmnist_test_pause-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fmnist-test-pause\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[lightning.pytorch.callbacks_factory]\nfmnist_test_pause = tests.pausing:callbacks\n"
    )
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{plugin}", VARIABLE: f"{step}:{folder}"}


def wait_for_pause(folder: Path, ranks: int, running: Any, describe: Any = lambda: "", timeout_s: float = 300) -> None:
    """Until every rank of a run started with `pause_env(folder, ...)` has paused; fails at once
    when `running()` says the run has ended, or after `timeout_s`, with `describe()` (its output)."""
    deadline = time.monotonic() + timeout_s
    while not all((folder / f"paused-rank{rank}").exists() for rank in range(ranks)):
        if not running():
            pytest.fail(f"the run ended before it paused:\n{describe()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the run did not pause in {timeout_s:.0f} s:\n{describe()}")
        time.sleep(0.05)


class Lines:
    """The lines a process writes to a text pipe, read by a thread of their own: a test waits for
    the next one with a time limit, and a process that writes more than the test reads never blocks
    on a full pipe."""

    def __init__(self, stream: IO[str], what: str) -> None:
        self.what, self._lines = what, queue.Queue[str]()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")  # the end of the stream

    def next(self, timeout_s: float = 60) -> str:
        """The next line; "" once the stream has ended."""
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"{self.what} wrote no line in {timeout_s:.0f} s")


def ended_output(proc: Any) -> str:
    """The tail of a finished process's captured output (stdout and stderr pipes, text mode)."""
    if proc.poll() is None:
        return "(still running)"
    out, err = proc.communicate(timeout=60)
    return f"exit code {proc.returncode}\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}"


def wait_until(ready: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.5)


# Restart and resume tests: where a run's last checkpoint has got to, its weights and per-epoch metrics.
METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro")
EPOCH_METRICS = ("epoch", *METRICS)


class SignalAt(Callback):
    """Sends the process a signal at the end of one training step, as Ctrl-C would."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGINT) -> None:
        self.epoch, self.batch, self.signum = epoch, batch, signum

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)


def saved_step(run: Path) -> int:
    """The global step of the run's last.ckpt; -1 while it is not there yet or being replaced."""
    import torch

    try:
        return int(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def last_weights(run: Path) -> dict[str, Any]:
    """The state dict of the run's last.ckpt."""
    import torch

    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def epoch_metrics(run: Path) -> list[dict[str, float]]:
    """metrics.csv's rows (none before the first epoch has ended), restricted to the metrics a
    resumed run must reproduce exactly."""
    import csv

    if not (run / "metrics.csv").exists():
        return []
    with (run / "metrics.csv").open() as f:
        return [{k: float(row[k]) for k in EPOCH_METRICS} for row in csv.DictReader(f)]


# Headless Chromium, for the pages the tool writes (report.html) and serves (`fmnist serve`).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync", "--disable-quic",
                  "--disable-background-networking", "--disable-component-update"]  # fmt: skip


def chromium(profile: Path, *args: str) -> list[str]:
    """The command line of a headless Chromium with a profile of its own; skip without Chromium."""
    return [need_program("chromium", "chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]


def chromium_dom(page: Path, profile: Path) -> str:
    """The DOM of a local page once Chromium has loaded it and run its scripts (5 s of virtual time)."""
    command = chromium(profile, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


class ChromiumPage:
    """A page open in headless Chromium, driven over the DevTools protocol; every wait has a limit."""

    def __init__(self, url: str, profile: Path, timeout_s: float = 30) -> None:
        self.url, self.profile, self.timeout_s = url, profile, timeout_s

    def __enter__(self) -> ChromiumPage:
        need("websockets", "test")
        from websockets.sync.client import connect

        command = chromium(self.profile, "--remote-debugging-port=0", "--window-size=900,800", "about:blank")
        self.browser = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        try:
            stderr = Lines(self.browser.stderr, "Chromium")  # type: ignore[arg-type]
            line = ""
            while "DevTools listening on" not in line:
                line = stderr.next(self.timeout_s)
                assert line, "Chromium exited before listening"
            self.socket = connect(line.split("on ", 1)[1].strip(), max_size=2**24, open_timeout=self.timeout_s)
            self._ids = iter(range(1, 1_000_000))
            self.session: str | None = None
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable")
            self.call("Page.navigate", url=self.url)
        except BaseException:
            self._close_browser()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.socket.close()
        self._close_browser()

    def _close_browser(self) -> None:
        self.browser.terminate()
        self.browser.wait(timeout=30)

    def call(self, method: str, **params: object) -> dict[str, Any]:
        """One DevTools command (in the page's session once it has one), and its result."""
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params}
        self.socket.send(json.dumps(message | ({"sessionId": self.session} if self.session else {})))
        deadline = time.monotonic() + self.timeout_s  # events may come before the reply, but not for ever
        while True:
            reply = json.loads(self.socket.recv(timeout=max(0.0, deadline - time.monotonic())))
            if reply.get("id") == message_id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """The value of `expression` once it is truthy; fails with `what` after the time limit."""
        deadline = time.monotonic() + self.timeout_s
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"{what} within {self.timeout_s:.0f} s"
            time.sleep(0.1)
        return value
