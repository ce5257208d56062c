"""The distributed path, proven on the CPU with two gloo processes (Lightning's own DDP launcher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECORDING_SCRIPT = """
import json, sys
from pathlib import Path
from lightning.pytorch.callbacks import Callback
from fmnist_lightning.settings import Settings
from fmnist_lightning.training import run_fit

class RecordSamples(Callback):
    def __init__(self):
        self.seen = []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen += batch.indices.tolist()
    def on_train_end(self, trainer, module):
        Path(sys.argv[2], f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))

settings = Settings(accelerator="cpu", devices="2", strategy="ddp", max_epochs=1, batch_size=64,
                    limit_train_batches=5, limit_val_batches=2, offline=True, progress=False)
run_fit(settings, out=Path(sys.argv[1]), extra_callbacks=[RecordSamples()])
"""


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONUNBUFFERED": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "COLUMNS": "200"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_ddp_ranks_train_on_disjoint_shards(real_data: None, tmp_path: Path) -> None:
    script = tmp_path / "ddp_fit.py"
    script.write_text(RECORDING_SCRIPT)
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    result = _run([sys.executable, str(script), str(tmp_path / "run"), str(seen_dir)], cwd=Path.cwd())
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((seen_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5 * 64
    assert not set(ranks[0]) & set(ranks[1])
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch, written once


@pytest.mark.slow
def test_cli_ddp_fit_then_two_device_test_counts_each_image_once(trained_run: Path, tmp_path: Path, cli) -> None:
    fmnist = [sys.executable, "-m", "fmnist_lightning"]
    tiny = ["--offline", "--max-epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "1", "--no-progress"]
    result = _run([*fmnist, "fit", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *tiny], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["001"]  # both processes wrote the same, single run folder
    assert [p.name for p in (runs[0] / "checkpoints").glob("best*.ckpt")] == ["best.ckpt"]
    # Clean output: one summary (rank 0 only), one data-source line, and no warning a user cannot act
    # on (val metrics are synchronised by torchmetrics, so Lightning's sync_dist advice is silenced).
    assert result.stdout.count("best val accuracy") == 1 and result.stderr.count("Fashion-MNIST: ") == 1
    assert "sync_dist" not in result.stderr and "srun" not in result.stderr, result.stderr[-3000:]

    ckpt = trained_run / "checkpoints" / "best.ckpt"
    two = _run([*fmnist, "test", "--ckpt", str(ckpt), "--accelerator", "cpu", "--devices", "2", "--offline",
                "--out", str(tmp_path / "two")], tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    code, _, err = cli("test", "--ckpt", ckpt, "--accelerator", "cpu", "--offline", "--out", tmp_path / "one")
    assert code == 0, err
    report_two = json.loads((tmp_path / "two" / "report.json").read_text())
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report_two["num_samples"] == report_one["num_samples"] == 10000
    assert report_two["accuracy"] == report_one["accuracy"]
    assert report_two["confusion_matrix"] == report_one["confusion_matrix"]
    predictions = (tmp_path / "two" / "predictions.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in predictions] == list(range(10000))


def test_asking_for_a_gpu_without_one_is_a_usage_error(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no GPU visible, on any machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli("fit", "--gpus", "1", "--offline", "--out", tmp_path / "run")
    assert code == 2
    assert "no GPU is visible" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_hardware_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fmnist_lightning import hardware
    from fmnist_lightning.errors import UsageError
    from fmnist_lightning.hardware import resolve_hardware
    from fmnist_lightning.settings import HardwareSettings

    monkeypatch.setattr(hardware, "CPU_INFO", tmp_path / "no-cpuinfo")  # a CPU without native bf16 (test_bf16.py)

    def resolve(accelerator: str = "auto", devices: str = "auto", precision: str = "auto", **kw: object):
        return resolve_hardware(HardwareSettings(accelerator=accelerator, devices=devices, precision=precision, **kw))

    cpu2 = resolve(accelerator="cpu", devices="2")
    assert (cpu2.accelerator, cpu2.devices, cpu2.strategy, cpu2.precision) == ("cpu", 2, "ddp", "32-true")
    assert resolve(gpus=0).accelerator == "cpu"
    assert resolve(accelerator="cpu", precision="bf16-mixed").precision == "bf16-mixed"
    with pytest.raises(UsageError, match="16-mixed needs a GPU"):
        resolve(accelerator="cpu", precision="16-mixed")
    with pytest.raises(ValueError, match="a count >= 1"):  # refused by the settings already
        resolve(devices="0")

    # Under torchrun `auto` means the processes it started on this node, and the world must match it.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (resolve(accelerator="cpu").devices, resolve(accelerator="cpu").strategy) == (2, "ddp")
    monkeypatch.setenv("WORLD_SIZE", "4")  # two nodes
    assert resolve(accelerator="cpu", num_nodes=2).devices == 2
    with pytest.raises(UsageError, match=r"torchrun started 4 processes \(2 per node\), but --devices 2 --num-nodes 1 "
                       r"make 2; give --devices 2 --num-nodes 2"):  # fmt: skip
        resolve(accelerator="cpu")
    with pytest.raises(UsageError, match="but --devices 1 --num-nodes 2 make 2; give --devices 2 --num-nodes 2"):
        resolve(accelerator="cpu", devices="1", num_nodes=2)
