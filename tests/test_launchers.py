"""The torchrun command of docs/scaling.md, run for real: two torchrun agents on this machine act as two nodes
(one CPU process each, gloo), with the static rendezvous docs/scaling.md shows (--master-addr/--master-port)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_FIT, free_port, launcher_env

FMNIST = ["-m", "fmnist_lightning"]
TWO_NODES_CPU = ["--accelerator", "cpu", "--devices", "1", "--num-nodes", "2", "--strategy", "ddp"]

# Run by torchrun in place of `-m fmnist_lightning fit`: the same fit, plus a callback that records
# which samples each rank trained and validated on, and how Lightning saw the process group.
RECORDING_SCRIPT = """
import json, sys
from pathlib import Path
from lightning.pytorch.callbacks import Callback
from fmnist_lightning.settings import DataSettings, Settings
from fmnist_lightning.training import run_fit

class Record(Callback):
    def __init__(self):
        self.train, self.val = [], []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train += batch.indices.tolist()
    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val += batch.indices.tolist()
    def on_fit_end(self, trainer, module):
        seen = {"train": self.train, "val": self.val, "world_size": trainer.world_size,
                "node_rank": trainer.node_rank,
                "cluster_environment": type(trainer.strategy.cluster_environment).__name__}
        Path(sys.argv[2], f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))

settings = Settings(accelerator="cpu", devices="1", num_nodes=2, strategy="ddp", max_epochs=1,
                    limit_train_batches=4, offline=True, progress=False)  # all 5,000 validation images
run_fit(settings, out=Path(sys.argv[1]), extra_callbacks=[Record()])
"""


def two_nodes(args: list[str], cwd: Path, logs: Path, timeout: float = 300) -> None:
    """Run `torchrun ... ARGS` as node 0 and node 1 of a two-node job; fail unless both succeed.

    Each agent is its own process group, so a hung one is killed with all its workers."""
    port = free_port()
    env = launcher_env()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for node in (0, 1):
            cmd = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)]
            cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), *args]
            with (logs / f"node{node}.log").open("w") as log:
                out = {"stdout": log, "stderr": subprocess.STDOUT}
                procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, **out))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{_tails(logs)}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"torchrun exit codes {codes}:\n{_tails(logs)}"


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {f.name}:\n{f.read_text()[-3000:]}" for f in sorted(logs.glob("*.log")))


def validation_accuracy(ckpt: Path) -> float:
    """The checkpoint's accuracy on all 5,000 validation images, computed here in one process."""
    from fmnist_lightning.checkpoints import load_classifier
    from fmnist_lightning.data import FashionMNISTDataModule, to_float_images
    from fmnist_lightning.settings import DataSettings

    model = load_classifier(ckpt)
    images, labels = FashionMNISTDataModule.from_settings(DataSettings(offline=True), eval_batch_size=250).split("val")
    assert len(labels) == 5000
    with torch.inference_mode():
        predicted = torch.cat([model(to_float_images(x)).argmax(1) for x in images.split(250)])
    return float((predicted == labels).double().mean())


def test_torchrun_two_nodes_ranks_and_shards(real_data: None, tmp_path: Path) -> None:
    script = tmp_path / "fit_recording.py"
    script.write_text(RECORDING_SCRIPT)
    seen = tmp_path / "seen"
    seen.mkdir()
    two_nodes([str(script), str(tmp_path / "run"), str(seen)], cwd=tmp_path, logs=tmp_path / "logs")

    ranks = [json.loads((seen / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:  # Lightning took the process group from torchrun's variables
        assert (rank["world_size"], rank["cluster_environment"]) == (2, "TorchElasticEnvironment")
    assert [rank["node_rank"] for rank in ranks] == [0, 1]
    train = [rank["train"] for rank in ranks]
    assert len(train[0]) == len(train[1]) == 4 * 128
    assert not set(train[0]) & set(train[1])  # disjoint shards
    val = ranks[0]["val"] + ranks[1]["val"]
    assert sorted(val) == list(range(5000))  # every validation image, each exactly once
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_torchrun_two_nodes_fit_and_test_as_in_the_readme(real_data: None, tmp_path: Path, cli) -> None:
    # docs/scaling.md: torchrun --nnodes 2 --nproc-per-node 4 --node-rank $NODE_RANK --master-addr $MASTER_ADDR
    #   --master-port 29500 -m fmnist_lightning fit --gpus 4 --num-nodes 2 --strategy ddp --out runs/two-nodes
    work = tmp_path / "work"
    work.mkdir()
    # fp32, as the one-process recomputation below runs the model (`auto` is bf16-mixed on a CPU with
    # native bf16): what is compared is which images each node validated, not the arithmetic.
    fit = [*FMNIST, "fit", *TWO_NODES_CPU, "--out", "runs/two-nodes", *TINY_FIT, "--precision", "32-true"]
    two_nodes(fit, cwd=work, logs=tmp_path / "fit-logs")

    assert [p.name for p in (work / "runs").iterdir()] == ["two-nodes"]  # one run folder
    run = work / "runs" / "two-nodes"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1  # one epoch, written once
    val_acc = float(rows[0].split(",")[header.split(",").index("val/acc")])
    # val/acc is over all 5,000 validation images, not one node's half
    assert val_acc == pytest.approx(validation_accuracy(run / "checkpoints" / "best.ckpt"), abs=1e-6)

    ckpt = run / "checkpoints" / "best.ckpt"
    test = [*FMNIST, "test", "--ckpt", str(ckpt), *TWO_NODES_CPU, "--offline", "--out", "two-node-test"]
    two_nodes(test, cwd=work, logs=tmp_path / "test-logs")
    code, _, err = cli("test", "--ckpt", ckpt, "--accelerator", "cpu", "--offline", "--out", tmp_path / "one")
    assert code == 0, err
    two = json.loads((work / "two-node-test" / "report.json").read_text())
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert two["num_samples"] == one["num_samples"] == 10000
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    assert two["confusion_matrix"] == one["confusion_matrix"]
    predictions = (work / "two-node-test" / "predictions.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in predictions] == list(range(10000))  # each image once
