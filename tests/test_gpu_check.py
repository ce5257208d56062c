"""scripts/gpu_check.sh without a GPU: its plan, its paths, and its timeout/stop/summary logic.

A stub interpreter (GPU_CHECK_PYTHON) stands in for Python: it passes or fails the import check,
fakes each step's output files in a blink, sleeps or fails where told (FAKE_SLEEP, FAKE_FAIL: a
substring of the command line), and hands the summary script to the real Python. A fake nvidia-smi
sits first on PATH. No test imports torch or trains anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ("data", "fit", "test", "bench-b128", "bench-b512", "bench-compiled-b512")

STUB = f"""#!{sys.executable}
import json, os, sys, time
from pathlib import Path

args = sys.argv[1:]
line = " ".join(args)
if args[:1] == ["-"]:  # the summary script on stdin: the real Python writes it
    os.execv(sys.executable, [sys.executable, *args])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps([sys.argv[0], *args]) + "\\n")
if os.environ.get("FAKE_SLEEP") and os.environ["FAKE_SLEEP"] in line:
    Path(os.environ["FAKE_CALLS"] + ".sleeper").write_text(str(os.getpid()))
    time.sleep(60)
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in line:
    sys.exit(3)


def after(option):
    return Path(args[args.index(option) + 1])


if args[0] == "-c":
    if "cuda_available" in args[1]:  # the versions probe
        gpu = not os.environ.get("FAKE_NO_CUDA")
        print(json.dumps({{"torch": "2.9.0-stub", "cuda": "12.8", "lightning": "2.5-stub", "cuda_available": gpu}}))
    else:  # the import check
        sys.exit(1 if os.environ.get("FAKE_IMPORTS_FAIL") else 0)
elif args[:2] == ["-m", "venv"]:
    python = Path(args[-1]) / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(Path(sys.argv[0]).read_text())
    python.chmod(0o755)
elif args[:3] == ["-m", "fmnist_lightning", "fit"]:
    run = after("--out")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_text("stub")
    (run / "config.yaml").write_text("precision: auto\\nprovenance:\\n  resolved_precision: bf16-mixed\\n")
    (run / "metrics.csv").write_text("epoch,val_acc\\n0,0.9\\n")
    if "--test" in args:
        (run / "report.json").write_text(json.dumps({{"accuracy": 0.93, "loss": 0.2, "num_samples": 10000}}))
elif args[:3] == ["-m", "fmnist_lightning", "test"]:
    (after("--out") / "report.json").write_text(json.dumps({{"accuracy": 0.9, "loss": 0.3, "num_samples": 10000}}))
elif args[0] == "scripts/benchmark.py":
    after("--json").write_text(json.dumps({{"ratios": {{"fmnist/raw train": 0.9}}, "argv": args}}))
"""

NVIDIA_SMI = """#!/bin/sh
if [ "$#" -gt 0 ]; then echo "NVIDIA H200, 143771 MiB, 570.00"; else echo "fake nvidia-smi table"; fi
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def stub(tmp_path: Path) -> dict[str, str]:
    """Environment for the script: the stub Python, a fake nvidia-smi on PATH, a log of the stub's calls."""
    python = _executable(tmp_path / "stub" / "python", STUB)
    _executable(tmp_path / "stub" / "bin" / "nvidia-smi", NVIDIA_SMI)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON" and not k.startswith(("GPU_CHECK_", "FAKE_"))}
    env.update(GPU_CHECK_PYTHON=str(python), FAKE_CALLS=str(tmp_path / "stub" / "calls.jsonl"))
    env["PATH"] = f"{tmp_path / 'stub' / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(SCRIPT), *args]
    return subprocess.run(command, env={**env, **extra}, cwd=cwd, capture_output=True, text=True, timeout=60)


def _calls(env: dict[str, str]) -> list[list[str]]:
    path = Path(env["FAKE_CALLS"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _plan_line(stdout: str, step: str) -> str:
    return next(line for line in stdout.splitlines() if line.split()[:1] == [step])


def test_gpu_check_parses_helps_and_refuses_bad_usage(tmp_path: Path) -> None:
    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60)

    assert script("-n", str(SCRIPT)).returncode == 0
    helped = script(str(SCRIPT), "--help")
    assert helped.returncode == 0 and "--dry-run" in helped.stdout and "GPU_CHECK_STEP_TIMEOUT" in helped.stdout
    assert script(str(SCRIPT)).returncode == 2  # OUT_DIR is required
    assert script(str(SCRIPT), "out", "--seeds", "2").returncode == 2
    (tmp_path / "used" / "old.json").parent.mkdir()
    (tmp_path / "used" / "old.json").write_text("{}")
    refused = script(str(SCRIPT), str(tmp_path / "used"))
    assert refused.returncode == 2 and "not empty" in refused.stderr  # old results cannot pass for new ones


def test_dry_run_prints_every_step_with_its_interpreter_and_creates_nothing(
    stub: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _run([str(out), "--dry-run", "--strong", "--seeds", "2"], stub, tmp_path)
    assert result.returncode == 0, result.stderr
    python = stub["GPU_CHECK_PYTHON"]
    assert f"python for every step: {python}" in result.stdout
    for step in (*STEPS, "strong-1", "strong-2"):
        line = _plan_line(result.stdout, step)
        assert f"(timeout {'900' if step.startswith('strong') else ''}" in line
        assert line.split(") ", 1)[1].startswith(f"{python} ")  # the interpreter the steps will use
    fit, test = _plan_line(result.stdout, "fit"), _plan_line(result.stdout, "test")
    for option in ("--config configs/default.yaml", "--gpus 1", "--max-epochs 3", "--precision auto", "--offline"):
        assert option in fit
    assert f"--ckpt {out}/run/checkpoints/best.ckpt --gpus 1 --offline" in test
    assert f"data --data-dir {REPO}/data --out {out}/data" in _plan_line(result.stdout, "data")
    for batch in ("128", "512"):
        bench = _plan_line(result.stdout, f"bench-b{batch}")
        assert f"--batch-size {batch}" in bench and "--paths raw,fmnist,typical,fmnist-fast" in bench
        assert "--accelerator gpu --precision bf16-mixed --channels-last --steps 200" in bench
        assert f"--json {out}/bench-b{batch}.json" in bench
    compiled = _plan_line(result.stdout, "bench-compiled-b512")
    assert "--compile --paths raw,fmnist --batch-size 512" in compiled
    assert "--config configs/strong.yaml" in _plan_line(result.stdout, "strong-2")
    assert f"--test --seed 2 --out {out}/strong-2" in _plan_line(result.stdout, "strong-2")
    assert "venv" not in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["stub"]  # a dry run creates nothing, not even OUT_DIR
    assert [call[1] for call in _calls(stub)] == ["-c"]  # it only ran the import check


def test_dry_run_plans_a_venv_when_the_import_check_fails(stub: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run([str(out), "--dry-run"], stub, tmp_path, FAKE_IMPORTS_FAIL="1")
    assert result.returncode == 0, result.stderr
    venv_python = f"{out}/venv/bin/python"
    assert f"would run: {stub['GPU_CHECK_PYTHON']} -m venv --system-site-packages {out}/venv" in result.stdout
    assert f"would run: {venv_python} -m pip install -e {REPO}" in result.stdout
    assert f"python for every step: {venv_python}" in result.stdout
    for step in STEPS:
        assert _plan_line(result.stdout, step).split(") ", 1)[1].startswith(f"{venv_python} ")
    assert not out.exists()  # it only says it would make the venv


def test_relative_out_dir_and_data_dir_mean_the_callers_folder(stub: dict[str, str], tmp_path: Path) -> None:
    result = _run(["rel/out", "--data-dir", "mydata", "--dry-run"], stub, tmp_path)
    assert result.returncode == 0, result.stderr
    fit = _plan_line(result.stdout, "fit")
    assert f"--data-dir {tmp_path}/mydata --out {tmp_path}/rel/out/run" in fit
    assert f"--json {tmp_path}/rel/out/bench-b512.json" in _plan_line(result.stdout, "bench-b512")
    assert str(REPO / "rel") not in result.stdout and not (tmp_path / "rel").exists()


def test_a_step_that_times_out_records_124_and_the_next_steps_still_run(stub: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Each step gets 2 s; the stub sleeps through bench-b128 only.
    result = _run([str(out)], stub, tmp_path, GPU_CHECK_STEP_TIMEOUT="2", FAKE_SLEEP="--batch-size 128")
    assert result.returncode == 1, result.stderr  # not every step passed
    assert "bench-b128 ran out of its 2s (exit 124)" in result.stdout
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["env", *STEPS]
    assert {name: s["exit_code"] for name, s in steps.items()} == {
        "env": 0, "data": 0, "fit": 0, "test": 0, "bench-b128": 124, "bench-b512": 0, "bench-compiled-b512": 0
    }  # fmt: skip
    assert steps["bench-b128"]["timed_out"] and steps["bench-b128"]["timeout_s"] == 2
    assert not steps["fit"]["timed_out"]
    assert all((out / f"{name}.log").is_file() for name in STEPS)
    assert summary["ok"] is False and summary["stopped_early"] is None
    assert summary["gpu"] == "NVIDIA H200, 143771 MiB, 570.00"
    assert summary["nvidia_smi"].strip() == "fake nvidia-smi table"
    assert summary["versions"]["torch"] == "2.9.0-stub" and summary["versions"]["cuda"] == "12.8"
    assert summary["env"] == {"python": stub["GPU_CHECK_PYTHON"], "venv": "false", "repo": str(REPO),
                              "data_dir": str(REPO / "data")}  # fmt: skip
    assert summary["fit"]["resolved_precision"] == "bf16-mixed"
    assert summary["fit"]["metrics_csv"].startswith("epoch,val_acc")
    assert "precision: auto" in summary["fit"]["config_yaml"]
    assert summary["test_report"] == {"accuracy": 0.9, "loss": 0.3, "num_samples": 10000}
    assert set(summary["bench"]) == {"bench-b512", "bench-compiled-b512"}  # the timed-out one wrote nothing
    assert "--compile" in summary["bench"]["bench-compiled-b512"]["argv"]
    assert summary["strong"] == {}


def test_a_failed_import_check_builds_a_venv_and_every_step_uses_it(stub: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run([str(out), "--strong"], stub, tmp_path, FAKE_IMPORTS_FAIL="1")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _calls(stub)
    stub_python, venv_python = stub["GPU_CHECK_PYTHON"], str(out / "venv" / "bin" / "python")
    assert [stub_python, "-m", "venv", "--system-site-packages", str(out / "venv")] in calls
    assert [venv_python, "-m", "pip", "install", "-q", "-e", str(REPO)] in calls
    steps = [call for call in calls if call[1] != "-c" and call[1:3] not in (["-m", "venv"], ["-m", "pip"])]
    assert len(steps) == len(STEPS) + 1 and all(call[0] == venv_python for call in steps)  # + strong-1
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"] is True and summary["env"]["venv"] == "true" and summary["env"]["python"] == venv_python
    assert summary["strong"] == {"strong-1": {"accuracy": 0.93, "loss": 0.2, "num_samples": 10000}}


@pytest.mark.parametrize(
    ("fake", "message", "steps"),
    [
        ({"FAKE_FAIL": "fmnist_lightning data"}, "no Fashion-MNIST data", {"env": 0, "data": 3}),
        ({"FAKE_IMPORTS_FAIL": "1", "FAKE_FAIL": "-m venv"}, "could not create", {}),
        ({"FAKE_IMPORTS_FAIL": "1", "FAKE_FAIL": "-m pip"}, "pip install -e", {}),
        ({"FAKE_NO_CUDA": "1"}, "torch sees no GPU", {"env": 0}),
    ],
    ids=["data", "venv", "pip", "no-gpu"],
)
def test_a_check_that_cannot_go_on_stops_with_one_clear_line_and_a_summary(
    stub: dict[str, str], tmp_path: Path, fake: dict[str, str], message: str, steps: dict[str, int]
) -> None:
    out = tmp_path / "out"
    result = _run([str(out)], stub, tmp_path, **fake)
    assert result.returncode == 1
    assert f"stopping early: {message}" in result.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert message in summary["stopped_early"] and summary["ok"] is False
    assert {name: s["exit_code"] for name, s in summary["steps"].items()} == steps
    assert not any(call[1:3] == ["-m", "fmnist_lightning"] and call[3] == "fit" for call in _calls(stub))


def test_when_fit_fails_test_is_skipped_and_the_benchmarks_still_run(stub: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run([str(out)], stub, tmp_path, FAKE_FAIL="fmnist_lightning fit")
    assert result.returncode == 1
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["fit"]["exit_code"] == 3 and steps["test"] == {"exit_code": None, "skipped": steps["test"]["skipped"]}
    assert "best.ckpt" in steps["test"]["skipped"]
    assert [steps[name]["exit_code"] for name in ("bench-b128", "bench-b512", "bench-compiled-b512")] == [0, 0, 0]


def test_a_terminated_check_stops_its_step_and_still_writes_the_summary(stub: dict[str, str], tmp_path: Path) -> None:
    # `timeout` puts each step in a process group of its own: only the script can pass a signal on.
    out, sleeper = tmp_path / "out", Path(stub["FAKE_CALLS"] + ".sleeper")
    env = {**stub, "FAKE_SLEEP": "fmnist_lightning fit"}
    with subprocess.Popen(["bash", str(SCRIPT), str(out)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as script:  # fmt: skip
        deadline = time.monotonic() + 20
        while not sleeper.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeper.exists(), "fit never started"
        script.send_signal(signal.SIGTERM)
        _, stderr = script.communicate(timeout=30)
    assert script.returncode == 143 and "interrupted by SIGTERM" in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(sleeper.read_text()), 0)  # the step's process is gone too
    summary = json.loads((out / "gpu_check.json").read_text())
    assert {name: s["exit_code"] for name, s in summary["steps"].items()} == {"env": 0, "data": 0, "fit": 143}
    assert summary["stopped_early"] == "interrupted by SIGTERM" and summary["ok"] is False


def test_budget_shrinks_the_running_step_and_skips_the_steps_it_cannot_fit(
    stub: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # Steps of 10 s within 12 s in all: data runs (the steps before it take a blink, or a few seconds
    # on a busy machine), fit sleeps out what is left, nothing else fits.
    args = [str(out), "--budget", "12"]
    result = _run(args, stub, tmp_path, GPU_CHECK_STEP_TIMEOUT="10", FAKE_SLEEP="lightning fit")
    assert result.returncode == 1, result.stderr
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["data"]["exit_code"] == 0 and steps["fit"]["exit_code"] == 124 and steps["fit"]["timeout_s"] <= 10
    for name in ("bench-b128", "bench-b512", "bench-compiled-b512"):
        assert steps[name]["exit_code"] is None and "out of --budget 12" in steps[name]["skipped"]
    assert not any(call[1] == "scripts/benchmark.py" for call in _calls(stub))
