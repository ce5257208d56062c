"""The scripts under scripts/: benchmark (quick mode, tiny budget), SLURM job (gpu_check.sh: test_gpu_check.py)."""

from __future__ import annotations

import json
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmnist_lightning.runs import read_metrics
from tests.helpers import need

SCRIPTS = Path(__file__).parent.parent / "scripts"


# scripts/benchmark.py, run as a script on a faked CPU without native bf16 (hardware.CPU_INFO, where the
# project reads the CPU's flags and name): `auto` and the benchmark's own choices follow the fake, so
# fmnist-fast must train in fp32 and evaluate in onnxruntime (the tests install the 'export' extra)
# whatever CPU runs the test. test_bench.py covers the choice on both kinds.
FAKE_CPU_BENCHMARK = """
import runpy, sys
from pathlib import Path
from fmnist_lightning import hardware
hardware.CPU_INFO = Path(sys.argv[1])
sys.argv = sys.argv[2:]  # as `python scripts/benchmark.py ARGS` sees it
runpy.run_path(sys.argv[0], run_name="__main__")
"""
NO_BF16_CPU = "processor\t: 0\nmodel name\t: Fake CPU without bf16\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n\n"


def test_benchmark_quick_writes_json_for_all_paths(real_data: None, tmp_path: Path) -> None:
    need("onnxruntime", "export")
    out, cpuinfo = tmp_path / "bench.json", tmp_path / "cpuinfo"
    cpuinfo.write_text(NO_BF16_CPU * 2)
    args = [sys.executable, "-c", FAKE_CPU_BENCHMARK, str(cpuinfo), str(SCRIPTS / "benchmark.py"), "--quick",
            "--steps", "3", "--warmup-steps", "1", "--eval-batch-size", "500",
            "--paths", "raw,fmnist,typical,fmnist-fast", "--repeats", "2", "--json", str(out)]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"raw", "fmnist", "typical", "fmnist-fast"}
    for path in data["results"].values():
        assert path["train_images_per_s"] > 0 and path["eval_images_per_s"] > 0 and path["peak_rss_mb"] > 0
    assert {"fmnist/raw train", "fmnist/typical train", "fmnist/raw eval", "fmnist-fast/raw eval"} <= data[
        "ratios"
    ].keys()
    assert data["machine"]["cpu"] == "Fake CPU without bf16" and data["machine"]["cpu_bf16"] is False
    fast = data["results"]["fmnist-fast"]
    assert fast["settings"] == {"precision": "32-true", "channels_last": True, "eval_batch_size": 1000,
                                "eval_engine": "onnxruntime", "compile": False}  # fmt: skip
    for r in data["rounds"]:  # each round exported the model for onnxruntime: seconds, where torch needs none
        assert r["raw"]["eval_setup_s"] == r["typical"]["eval_setup_s"] == 0
        assert 0 <= r["fmnist"]["eval_setup_s"] < r["fmnist-fast"]["eval_setup_s"]
    assert data["versions"]["torch"] and data["config"]["steps"] == 3
    # Two rounds, the second in a rotated order; the reported ratio is the mean of the rounds' ratios.
    assert [r["order"] for r in data["rounds"]] == [
        ["raw", "fmnist", "typical", "fmnist-fast"],
        ["fmnist", "typical", "fmnist-fast", "raw"],
    ]
    per_round = [r["fmnist"]["train_images_per_s"] / r["raw"]["train_images_per_s"] for r in data["rounds"]]
    assert data["ratios_per_round"]["fmnist/raw train"] == pytest.approx(per_round)
    assert data["ratios"]["fmnist/raw train"] == pytest.approx(sum(per_round) / 2)
    assert data["ratios_median"]["fmnist/raw train"] == pytest.approx(sum(per_round) / 2)  # of two values
    # The spreads are the sample standard deviations over the two rounds.
    assert data["ratios_std"]["fmnist/raw train"] == pytest.approx(statistics.stdev(per_round))
    raw_speeds = [r["raw"]["train_images_per_s"] for r in data["rounds"]]
    assert data["results"]["raw"]["train_images_per_s_std"] == pytest.approx(statistics.stdev(raw_speeds))
    assert data["results"]["raw"]["rounds"] == 2
    assert "fmnist/raw train" in result.stdout and "+-" in result.stdout


def test_slurm_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / "slurm" / "train.sbatch")], check=True, timeout=30)


def test_validation_tta_shifts_move_the_image_and_fill_the_border_with_zeros() -> None:
    shifted = runpy.run_path(str(SCRIPTS / "validation_tta.py"))["shifted"]
    image = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    right = shifted(image, 0, 1)
    assert torch.equal(right[..., 1:], image[..., :3]) and (right[..., 0] == 0).all()
    up = shifted(image, -2, 0)
    assert torch.equal(up[..., :2, :], image[..., 2:, :]) and (up[..., 2:, :] == 0).all()
    assert torch.equal(shifted(image, 0, 0), image)


def test_validation_tta_reports_plain_and_flip_accuracy_on_the_validation_split(
    trained_run: Path, tmp_path: Path
) -> None:
    import lightning as L

    from fmnist_lightning.checkpoints import load_classifier
    from fmnist_lightning.data import FashionMNISTDataModule
    from fmnist_lightning.settings import DataSettings

    out = tmp_path / "val-tta.json"
    args = [sys.executable, str(SCRIPTS / "validation_tta.py"), str(trained_run), "--json", str(out)]
    result = subprocess.run([*args, "--shifts", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())["runs"][str(trained_run)]
    assert "with flip TTA" in result.stdout and 0.5 < measured["tta"] <= 1
    assert "with flip and 1-pixel shift TTA" in result.stdout and 0.5 < measured["tta+shift1"] <= 1
    # "plain" is what Lightning's validation loop gives for all 5,000 validation images.
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    datamodule = FashionMNISTDataModule.from_settings(DataSettings(offline=True), eval_batch_size=250)
    model = load_classifier(trained_run / "checkpoints" / "best.ckpt")
    (validated,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    assert measured["plain"] == pytest.approx(validated["val/acc"], abs=1e-6)

    missing = subprocess.run([*args[:2], str(tmp_path / "no-run")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    gone = tmp_path / "no-run" / "checkpoints" / "best.ckpt"
    assert missing.stderr.strip().splitlines() == [f"error: checkpoint {gone} does not exist"]


@pytest.mark.slow
def test_reproduce_trains_each_seed_once_and_tests_with_the_test_options(real_data: None, tmp_path: Path) -> None:
    """`scripts/reproduce.sh CONFIG N [fit options] -- [test options]`: fit options go to fit, the
    ones after `--` to test; a second call only tests again (the finished runs are kept, those
    that stopped at their --stop-at-val-acc target too)."""
    from tests.helpers import subprocess_env

    config = str(SCRIPTS.parent / "configs" / "default.yaml")
    # Two epochs asked for; the first reaches 10% validation accuracy, where the runs stop.
    args = ["bash", str(SCRIPTS / "reproduce.sh"), config, "2", "--offline", "--max-epochs", "2", "--stop-at-val-acc",
            "0.1", "--limit-train-batches", "3", "--limit-val-batches", "1", "--", "--tta"]  # fmt: skip
    env = subprocess_env(PYTHON=sys.executable, FMNIST=f"{sys.executable} -m fmnist_lightning")
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = [tmp_path / "runs" / "repro" / f"default-seed{seed}" for seed in (1, 2)]
    reports = [json.loads((run / "report.json").read_text()) for run in runs]
    assert all(report["tta"] and report["num_samples"] == 10000 for report in reports)
    assert "(n=2)" in first.stdout and "-- --tta" in first.stdout
    trained = [(run / "checkpoints" / "best.ckpt").stat().st_mtime_ns for run in runs]
    again = subprocess.run(args[:-2], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(run / "checkpoints" / "best.ckpt").stat().st_mtime_ns for run in runs] == trained  # not retrained
    assert [len(read_metrics(run / "metrics.csv")) for run in runs] == [1, 1]  # stopped at the target, kept
    assert not any(json.loads((run / "report.json").read_text())["tta"] for run in runs)  # tested again, plain


def test_step_profile_splits_a_fit_step_into_its_parts(real_data: None, tmp_path: Path) -> None:
    """scripts/step_profile.py: the real fit step's time, and the hand-written step's phases, which
    with Lightning's share add up to it."""
    out = tmp_path / "profile.json"
    args = [sys.executable, str(SCRIPTS / "step_profile.py"), "--rounds", "2", "--steps", "3", "--warmup", "1"]
    done = subprocess.run([*args, "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts_ms"]
    assert set(parts) == {"batcher", "forward", "backward", "optimizer", "lightning (fit minus the phases)"}
    assert all(r["fit_ms"] == pytest.approx(sum(r["phases_ms"].values()) + r["lightning_ms"]) for r in result["rounds"])
    assert result["fit_ms_per_step"] > 0 and result["operators"]["top"] and "fit:" in done.stdout
