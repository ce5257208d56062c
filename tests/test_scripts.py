"""The scripts under scripts/: benchmark (quick mode, tiny budget), SLURM job (gpu_check.sh: test_gpu_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent.parent / "scripts"


def test_benchmark_quick_writes_json_for_all_paths(real_data: None, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [sys.executable, str(SCRIPTS / "benchmark.py"), "--quick", "--steps", "3", "--warmup-steps", "1",
            "--eval-batch-size", "500", "--paths", "raw,fmnist,typical,fmnist-fast", "--repeats", "2",
            "--json", str(out)]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"raw", "fmnist", "typical", "fmnist-fast"}
    for path in data["results"].values():
        assert path["train_images_per_s"] > 0 and path["eval_images_per_s"] > 0 and path["peak_rss_mb"] > 0
    assert {"fmnist/raw train", "fmnist/typical train", "fmnist/raw eval", "fmnist-fast/raw eval"} <= data[
        "ratios"
    ].keys()
    fast = data["results"]["fmnist-fast"]
    assert fast["settings"]["channels_last"]
    if not data["machine"]["cpu_bf16"]:  # the tests install the 'export' extra: onnxruntime evaluates
        assert fast["settings"]["eval_engine"] == "onnxruntime" and fast["eval_setup_s"] > 0
        assert fast["settings"]["eval_batch_size"] == 1000
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
    assert data["ratios_std"]["fmnist/raw train"] >= 0 and data["results"]["raw"]["rounds"] == 2
    assert "fmnist/raw train" in result.stdout and "+-" in result.stdout


def test_slurm_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / "slurm" / "train.sbatch")], check=True)
