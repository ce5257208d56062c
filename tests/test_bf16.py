"""bf16-mixed: what `--precision auto` picks on a CPU with native bf16 (and on most GPUs), and
everything downstream of a model trained under it.

The choice is tested on faked CPUs (a cpuinfo file): native bf16 (avx512_bf16, amx_bf16) gives
bf16-mixed, anything else (AVX-512 alone emulates bf16 and is slower, an unreadable cpuinfo, another
system) stays on 32-true, and an explicit precision always wins. A model trained in bf16-mixed keeps
fp32 weights, resumes exactly, and tests, predicts, exports and averages like any other.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from fmnist_lightning import hardware
from fmnist_lightning.errors import TrainingInterrupted
from fmnist_lightning.hardware import resolve_hardware
from fmnist_lightning.settings import HardwareSettings
from fmnist_lightning.training import run_fit
from tests.helpers import METRICS, SignalAt, epoch_metrics, is_png, last_weights, need, tiny_settings

CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 {extra}\n\n"


@pytest.mark.parametrize(
    ("flags", "precision", "why"),
    [
        ("avx512f avx512bw avx512_bf16", "bf16-mixed", "the CPU has avx512_bf16"),
        ("avx512f amx_tile amx_bf16 avx512_bf16", "bf16-mixed", "the CPU has amx_bf16"),
        ("avx512f avx512bw avx512_vnni", "32-true", "the CPU has no native bf16"),  # emulated bf16 is slower
        ("", "32-true", "the CPU has no native bf16"),
        (None, "32-true", "the CPU has no native bf16"),  # no /proc/cpuinfo: another system, flags unknown
    ],
    ids=["avx512_bf16", "amx_bf16", "avx512-without-bf16", "no-avx512", "no-cpuinfo"],
)
def test_auto_precision_on_the_cpu_follows_native_bf16(
    flags: str | None, precision: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(CPUINFO.format(extra=flags) * 2)
    monkeypatch.setattr(hardware, "CPU_INFO", cpuinfo)
    monkeypatch.setattr(hardware, "CPU_BF16_BY_DEFAULT", True)
    hw = resolve_hardware(HardwareSettings(accelerator="cpu"))
    assert (hw.precision, hw.precision_why) == (precision, why)
    assert hw.precision_described == f"{precision} ({why})"
    # An explicit precision always wins, whatever the CPU; bf16 without native bf16 says it is emulated.
    for asked in ("32-true", "bf16-mixed"):
        hw = resolve_hardware(HardwareSettings(accelerator="cpu", precision=asked))
        emulated = asked == "bf16-mixed" and precision == "32-true"
        assert hw.precision == asked
        assert hw.precision_why == ("asked for" if not emulated else f"asked for; {hardware.EMULATED_BF16}")
        assert ("emulated" in hw.precision_described) == emulated


def test_bf16_asked_for_on_a_cpu_without_it_warns_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An explicit --precision bf16-mixed on a CPU without native bf16 trains (it was asked for),
    but says first that it is emulated: on M4 of docs/RESULTS.md it trained about 12x slower."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=""))
    monkeypatch.setattr(hardware, "CPU_INFO", cpuinfo)
    with caplog.at_level("WARNING", logger="fmnist_lightning"):
        run_fit(tiny_settings(**BF16, fast_dev_run=True))
    assert any("bf16-mixed: emulated: this CPU has no native bf16" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fmnist_lightning"):
        run_fit(tiny_settings(**{**BF16, "precision": "32-true"}, fast_dev_run=True))
    assert not any("emulated" in r.getMessage() for r in caplog.records)


def test_with_the_switch_off_a_bf16_cpu_stays_on_fp32_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra="avx512f avx512_bf16"))
    monkeypatch.setattr(hardware, "CPU_INFO", cpuinfo)
    monkeypatch.setattr(hardware, "CPU_BF16_BY_DEFAULT", False)
    hw = resolve_hardware(HardwareSettings(accelerator="cpu"))
    assert hw.precision_described == (
        "32-true (the CPU has avx512_bf16, but bf16's accuracy is not yet shown equal to fp32's)"
    )


def test_a_flag_named_in_another_line_does_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: avx512_bf16 marketing name\nflags\t\t: avx2\n")
    monkeypatch.setattr(hardware, "CPU_INFO", cpuinfo)
    monkeypatch.setattr(hardware, "CPU_BF16_BY_DEFAULT", True)
    assert resolve_hardware(HardwareSettings(accelerator="cpu")).precision == "32-true"


BF16 = dict(batch_size=64, limit_train_batches=12, precision="bf16-mixed", logger=("csv",))


@pytest.fixture(scope="module")
def bf16_run(real_data: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bf16") / "run"
    run_fit(tiny_settings(**BF16), out=out)
    return out


def test_a_bf16_run_keeps_fp32_weights_and_records_its_precision(bf16_run: Path) -> None:
    checkpoint = torch.load(bf16_run / "checkpoints" / "best.ckpt", weights_only=True)
    weights = [t for k, t in checkpoint["state_dict"].items() if k.startswith("net.") and t.is_floating_point()]
    assert weights and all(t.dtype == torch.float32 for t in weights)  # (the metric sums are float64)
    provenance = yaml.safe_load((bf16_run / "config.yaml").read_text())["provenance"]
    asked = resolve_hardware(HardwareSettings(accelerator="cpu", precision="bf16-mixed"))  # emulated or not
    assert provenance["resolved_precision"] == "bf16-mixed" and provenance["precision"] == asked.precision_described


def test_test_predict_and_tta_of_a_bf16_checkpoint(bf16_run: Path, cli, tmp_path: Path) -> None:
    ckpt = bf16_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "out"
    accuracies = {}
    for precision in ("32-true", "bf16-mixed"):
        code, _, err = cli("test", "--ckpt", ckpt, "--out", out, "--offline", "--precision", precision)
        assert code == 0, err
        accuracies[precision] = yaml.safe_load((out / "report.json").read_text())["accuracy"]
    # The same weights evaluated in fp32 and in bf16: well trained or not, within a few images in 10,000.
    assert accuracies["32-true"] > 0.5 and abs(accuracies["32-true"] - accuracies["bf16-mixed"]) < 0.005
    code, _, err = cli("test", "--ckpt", ckpt, "--out", out, "--offline", "--tta")
    assert code == 0 and yaml.safe_load((out / "report.json").read_text())["tta"] is True, err
    code, _, err = cli("predict-samples", "--ckpt", ckpt, "--out", out, "--offline", "--num", "4")
    assert code == 0 and is_png(out / "correct.png") and is_png(out / "incorrect.png"), err
    code, stdout, err = cli("predict", "--ckpt", ckpt, "--json", Path(__file__).parent / "data")
    assert code == 0, err
    assert len(json.loads(stdout)) == 2


def test_export_of_a_bf16_checkpoint_agrees_with_pytorch(bf16_run: Path, cli, tmp_path: Path) -> None:
    need("onnxruntime", "export")
    ckpt = bf16_run / "checkpoints" / "best.ckpt"
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        code, _, err = cli("export", "--ckpt", ckpt, "--format", fmt, "--out", tmp_path / name, "--offline")
        assert code == 0 and (tmp_path / name).is_file(), err  # the export checks agreement on 1000 images


def test_bf16_with_weight_averaging_validates_and_checkpoints_the_average(real_data: None, tmp_path: Path) -> None:
    result = run_fit(tiny_settings(**BF16, weight_averaging="ema", ema_decay=0.9), out=tmp_path / "ema")
    assert result.epochs == 2 and 0.5 < result.best_val_acc <= 1.0
    state = torch.load(result.best_checkpoint, weights_only=True)["state_dict"]
    weights = [t for k, t in state.items() if k.startswith("net.") and t.is_floating_point()]
    assert weights and all(t.dtype == torch.float32 for t in weights)


@pytest.mark.slow
def test_an_interrupted_bf16_run_resumes_exactly(real_data: None, tmp_path: Path) -> None:
    """Ctrl-C in epoch 1, then --resume: bf16 autocast changes nothing of what a resume restores."""
    s = tiny_settings(**BF16, augment=True, seed=5, deterministic=True)
    run_fit(s, out=tmp_path / "straight")
    with pytest.raises(TrainingInterrupted):
        run_fit(s, out=tmp_path / "cut", extra_callbacks=[SignalAt(0, 6, signal.SIGINT)])
    run_fit(s, out=tmp_path / "cut", resume=True)
    straight, resumed = epoch_metrics(tmp_path / "straight"), epoch_metrics(tmp_path / "cut")
    assert len(resumed) == 2
    for a, b in zip(straight, resumed):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name, tensor in last_weights(tmp_path / "straight").items():
        assert torch.equal(tensor, last_weights(tmp_path / "cut")[name]), name
    shutil.rmtree(tmp_path)
