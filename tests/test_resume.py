"""Interruptions cost nothing: Ctrl-C/SIGTERM save a resumable checkpoint, resuming gives the same
result as never stopping, kill -9 never corrupts a checkpoint, two runs never share a folder, and
seeded deterministic runs repeat bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fmnist_lightning.errors import FmnistError, TrainingInterrupted
from fmnist_lightning.runs import run_lock
from fmnist_lightning.settings import Settings
from fmnist_lightning.training import run_fit
from tests.helpers import (
    METRICS,
    Lines,
    SignalAt,
    ended_output,
    epoch_metrics,
    last_weights,
    pause_env,
    saved_step,
    wait_for_pause,
)


@pytest.fixture
def settings() -> Settings:
    """Dropout, augmentation and a cosine schedule: every piece of state a resume must restore."""
    return Settings(
        max_epochs=2,
        batch_size=64,
        limit_train_batches=12,
        limit_val_batches=2,
        augment=True,
        random_erasing=0.3,
        lr_schedule="cosine",
        seed=11,
        deterministic=True,
        offline=True,
        progress=False,
        accelerator="cpu",
    )


@pytest.mark.parametrize(
    ("epoch", "batch", "signum", "changes"),
    [
        (0, 6, signal.SIGINT, {}),
        (1, 2, signal.SIGTERM, {}),
        # Gradients of 5 batches per step (12 batches: steps after 5, 10 and the last 2): the signal
        # inside the second group stops after it, at a step, so no summed gradient is lost.
        (0, 6, signal.SIGINT, dict(accumulate_grad_batches=5)),
        # The average (from step 7 of 24 on) continues across the interruption.
        (0, 9, signal.SIGINT, dict(weight_averaging="swa", swa_start=0.3)),
    ],
    ids=["sigint", "sigterm-in-epoch-2", "accumulation", "swa"],
)
def test_interrupted_and_resumed_run_equals_uninterrupted(
    real_data: None, settings: Settings, tmp_path: Path, epoch: int, batch: int, signum: int, changes: dict[str, Any]
) -> None:
    def handlers() -> list[object]:  # SIGINT is SIG_IGN when the tests run as a background job
        return [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]

    settings = settings.replace(**changes)
    before = handlers()
    run_fit(settings, out=tmp_path / "straight")
    assert handlers() == before  # restored after a finished fit: a later SIGTERM still stops the process
    with pytest.raises(TrainingInterrupted, match=f"Continue with: fmnist fit --out {tmp_path / 'cut'} --resume"):
        run_fit(settings, out=tmp_path / "cut", extra_callbacks=[SignalAt(epoch, batch, signum)])
    assert handlers() == before  # and after an interrupted one
    interrupted_rows = len(epoch_metrics(tmp_path / "cut"))
    assert interrupted_rows == epoch
    if "accumulate_grad_batches" in changes:  # stopped at the end of the group the signal came in: batch 10
        assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    run_fit(settings, out=tmp_path / "cut", resume=True)

    straight, resumed = epoch_metrics(tmp_path / "straight"), epoch_metrics(tmp_path / "cut")
    assert [r["epoch"] for r in resumed] == [1.0, 2.0]
    for a, b in zip(straight, resumed):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name, tensor in last_weights(tmp_path / "straight").items():
        assert torch.allclose(tensor.float(), last_weights(tmp_path / "cut")[name].float(), atol=1e-5), name


def test_resume_can_extend_a_finished_run(real_data: None, settings: Settings, tmp_path: Path) -> None:
    short = settings.replace(max_epochs=1, lr_schedule="none")
    run_fit(short, out=tmp_path / "run")
    result = run_fit(short.replace(max_epochs=2), out=tmp_path / "run", resume=True)
    assert result.epochs == 2
    assert [r["epoch"] for r in epoch_metrics(tmp_path / "run")] == [1.0, 2.0]


def test_resume_refuses_to_stretch_a_scheduled_run(real_data: None, settings: Settings, tmp_path: Path) -> None:
    from fmnist_lightning.errors import UsageError

    short = settings.replace(max_epochs=1, lr_schedule="onecycle")
    run_fit(short, out=tmp_path / "run")
    with pytest.raises(UsageError, match="onecycle learning-rate schedule is sized for 1 epochs"):
        run_fit(short.replace(max_epochs=2), out=tmp_path / "run", resume=True)


def test_same_seed_deterministic_runs_are_bit_identical(real_data: None, settings: Settings, tmp_path: Path) -> None:
    one_epoch = settings.replace(max_epochs=1)
    run_fit(one_epoch, out=tmp_path / "a")
    run_fit(one_epoch, out=tmp_path / "b")
    assert epoch_metrics(tmp_path / "a") == epoch_metrics(tmp_path / "b")
    a, b = last_weights(tmp_path / "a"), last_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_fit_on_the_same_folder_is_refused(real_data: None, settings: Settings, tmp_path: Path, cli) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        code, _, err = cli("fit", "--offline", "--out", run, "--max-epochs", "1")
    assert code == 1
    assert "another fmnist process" in err and "is writing to" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused run wrote nothing


def test_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from fmnist_lightning.runs import run_lock; from pathlib import Path; "
         f"import time\nwith run_lock(Path({str(tmp_path)!r})):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and Lines(holder.stdout, "the lock holder").next().strip() == "locked"
    with pytest.raises(FmnistError, match="another fmnist process"), run_lock(tmp_path):
        pass
    holder.kill()  # kill -9: the kernel drops the lock with the process
    holder.wait(timeout=60)
    with run_lock(tmp_path):
        pass


SAVE_LOOP = """
import sys, torch
from pathlib import Path
from fmnist_lightning.checkpoints import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), Path(sys.argv[1])
for i in range(10**6):
    io.save_checkpoint({"i": i, "weights": torch.full((3_000_000,), float(i))}, path)
    print(i, flush=True)
"""


@pytest.mark.parametrize("saves", [1, 3, 8])
def test_kill_9_during_saves_never_leaves_a_corrupt_checkpoint(tmp_path: Path, saves: int) -> None:
    """Killed while a save is being written (its temporary file has data), after `saves` whole
    ones: the checkpoint is the last whole save, and the half-written one was never renamed in."""
    path = tmp_path / "last.ckpt"
    for _ in range(5):  # the kill may land just after a save's rename: then it was not mid-save
        for stale in tmp_path.glob(".last.ckpt.tmp-*"):
            stale.unlink()
        saver = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path)], stdout=subprocess.PIPE, text=True)
        assert saver.stdout is not None
        saved = Lines(saver.stdout, "the save loop")
        for _ in range(saves):
            assert saved.next(), "the save loop ended"
        deadline = time.monotonic() + 60
        while not _written_to(path):  # a save under way
            assert saver.poll() is None, "the save loop ended"
            assert time.monotonic() < deadline, "in 60 s no save wrote to a temporary file (to rename it into place)"
            time.sleep(0.001)
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=60)
        if _temporary(path):
            break
    else:
        pytest.fail("in 5 tries no kill landed while a save was being written")
    ckpt = torch.load(path, weights_only=True)  # always a whole checkpoint
    assert ckpt["i"] >= saves - 1  # the newest whole save or a later one, never a part of the next
    assert torch.equal(ckpt["weights"], torch.full((3_000_000,), float(ckpt["i"])))


def _temporary(path: Path) -> list[Path]:
    """The temporary files of saves under way (AtomicCheckpointIO writes there, then renames)."""
    return list(path.parent.glob(f".{path.name}.tmp-*"))


def _written_to(path: Path) -> bool:
    """Whether a save is under way and has written part of its checkpoint."""
    for tmp in _temporary(path):
        try:
            if tmp.stat().st_size > 0:
                return True
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return False


@pytest.mark.slow
def test_ctrl_c_in_the_cli_saves_and_prints_the_resume_command(real_data: None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [sys.executable, "-m", "fmnist_lightning", "fit", "--offline", "--accelerator", "cpu", "--no-progress",
            "--max-epochs", "1", "--limit-train-batches", "300", "--limit-val-batches", "1",
            "--out", str(run)]  # fmt: skip
    env = {**os.environ, "COLUMNS": "300"}
    pause = tmp_path / "pause"
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**env, **pause_env(pause, 3)})
    wait_for_pause(pause, 1, lambda: proc.poll() is None, lambda: ended_output(proc))  # training, at step 3
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"Continue with: fmnist fit --out {run} --resume" in err and "Traceback" not in err
    # Step 3's own check for a signal had run before the pause: the run stops after the next step.
    assert "stopped by SIGINT in epoch 1 after step 4;" in err, err
    assert saved_step(run) == 4
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(epoch_metrics(run)) == 1


DDP_FIT = ["-m", "fmnist_lightning", "fit", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--max-epochs", "2", "--batch-size", "64", "--limit-train-batches", "30", "--limit-val-batches", "2",
           "--augment", "--random-erasing", "0.3", "--seed", "11", "--deterministic", "--offline", "--no-progress",
           "--checkpoint-every-n-steps", "0"]  # fmt: skip


def _ddp_fit(run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "PYTHONUNBUFFERED": "1", "COLUMNS": "300", **(env or {})}
    for name in ("FMNIST_RUN_DIR", "TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        env.pop(name, None)
    args = [sys.executable, *DDP_FIT, "--out", str(run), *extra]
    # Its own process group, as a terminal's: Ctrl-C reaches both processes of Lightning's launcher.
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


@pytest.mark.slow
def test_ddp_run_interrupted_and_resumed_equals_uninterrupted(real_data: None, tmp_path: Path) -> None:
    """Two gloo processes with dropout and augmentation, Ctrl-C in the second epoch, then --resume:
    each rank's RNG stream and data position are restored, so the metrics are the uninterrupted run's."""
    # Both ranks pause after step 33, inside epoch 2 (steps 31-60), where the signal reaches them;
    # they agree to stop at their next check, at step 40.
    pause = tmp_path / "pause"
    cut = _ddp_fit(tmp_path / "cut", env=pause_env(pause, 33))
    wait_for_pause(pause, 2, lambda: cut.poll() is None, lambda: ended_output(cut))
    os.killpg(cut.pid, signal.SIGINT)
    _, err = cut.communicate(timeout=300)
    assert cut.returncode == 130 and "Continue with: fmnist fit --out" in err, err[-3000:]
    assert "stopped by SIGINT in epoch 2 after step 40;" in err, err[-3000:]
    assert saved_step(tmp_path / "cut") == 40
    resumed = _ddp_fit(tmp_path / "cut", "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    straight = _ddp_fit(tmp_path / "straight")
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]
    assert [r["epoch"] for r in epoch_metrics(tmp_path / "cut")] == [1.0, 2.0]
    assert epoch_metrics(tmp_path / "cut") == epoch_metrics(tmp_path / "straight")
    for name, tensor in last_weights(tmp_path / "straight").items():
        assert torch.equal(tensor, last_weights(tmp_path / "cut")[name]), name


def test_ranks_draw_different_augmentations() -> None:
    from fmnist_lightning.data import Augment, TensorBatches

    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    augment = Augment(translate=2, hflip=True, erase_p=0.5)
    same = torch.arange(32)
    batches = [TensorBatches(images, labels, 32, seed=1, rank=r, world_size=2, augment=augment) for r in (0, 1)]
    first, second = (b.make_batch(same, batch_number=1).images for b in batches)
    assert not torch.equal(first, second)  # the same images, augmented differently on each rank
