"""A pause at a chosen training step, for tests that stop a launched run from outside (a signal, a
kill -9, a SLURM requeue): the test waits for the pause, an event, instead of for a time, so what it
sends lands at a known step however fast or slow the machine is.

`helpers.pause_env(folder, step)` gives the environment that turns it on in every process of a
run: Lightning loads `callbacks` below through its entry points for external callbacks (the group
lightning.pytorch.callbacks_factory, registered by a small .dist-info folder on PYTHONPATH), so
rank 1 under Lightning's launcher, torchrun's workers and SLURM's tasks get it too, with no change
to the package.

At the end of step STEP each rank writes FOLDER/paused-rank<R> and waits until a SIGINT or SIGTERM
has reached it (its handler, the run's own, runs as usual) or FOLDER/go exists (what a test writes
after a kill -9, for the processes that survive). A rank pauses once: started again (a restart, a
requeue, a resume) it runs straight through.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

VARIABLE = "FMNIST_TEST_PAUSE"  # "STEP:FOLDER"
TIMEOUT_S = 600


class PauseAt(Callback):
    def __init__(self, step: int, folder: Path) -> None:
        self.step, self.folder = step, folder

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        marker = self.folder / f"paused-rank{trainer.global_rank}"
        if trainer.global_step != self.step or marker.exists():
            return
        received: list[int] = []
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

        def note(signum: int, frame: Any) -> None:
            received.append(signum)
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        for signum in previous:
            signal.signal(signum, note)
        try:
            marker.write_text(str(os.getpid()))  # after the handlers: a signal sent on seeing it is noted
            deadline = time.monotonic() + TIMEOUT_S
            while not received and not (self.folder / "go").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"paused at step {self.step} for {TIMEOUT_S} s: the test never signalled")
                time.sleep(0.01)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def callbacks() -> list[Callback]:
    """Lightning's entry point: a PauseAt when the environment asks for one."""
    if not (spec := os.environ.get(VARIABLE)):
        return []
    step, folder = spec.split(":", 1)
    return [PauseAt(int(step), Path(folder))]
