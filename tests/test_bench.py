"""The benchmark's arithmetic: round order, per-round ratios and their summary, on made-up results."""

from __future__ import annotations

import pytest

from fmnist_lightning.bench import PathResult, _ratios, _summary, round_order


def _result(train: float, evaluation: float) -> PathResult:
    return PathResult(
        train_images_per_s=train,
        warmup_s=1.0,
        epoch_s=1.0 + 55000 / train,
        eval_images_per_s=evaluation,
        eval_batch_size=1000,
        eval_setup_s=0.0,
        peak_rss_mb=100.0,
        cuda_max_allocated_mb=None,
    )


def test_rounds_rotate_so_every_path_takes_every_position() -> None:
    paths = ("raw", "fmnist", "typical")
    orders = [round_order(paths, r) for r in range(3)]
    assert orders == [("raw", "fmnist", "typical"), ("fmnist", "typical", "raw"), ("typical", "raw", "fmnist")]
    for position in range(3):
        assert {order[position] for order in orders} == set(paths)


def test_ratios_are_taken_within_a_round() -> None:
    ratios = _ratios({"raw": _result(2000, 3000), "fmnist": _result(1900, 3300), "typical": _result(1000, 1500)})
    assert ratios["fmnist/raw train"] == pytest.approx(0.95)
    assert ratios["fmnist/raw eval"] == pytest.approx(1.1)
    assert ratios["fmnist/typical train"] == pytest.approx(1.9)
    assert "fmnist-fast/raw train" not in ratios


def test_summary_is_the_mean_with_the_spread_of_the_rounds() -> None:
    summary = _summary([_result(1000, 2000), _result(3000, 4000)])
    assert summary["train_images_per_s"] == 2000 and summary["eval_images_per_s"] == 3000
    assert summary["train_images_per_s_std"] == pytest.approx(1414.2136, rel=1e-6)
    assert summary["rounds"] == 2 and summary["peak_rss_mb"] == 100.0


@pytest.mark.slow
def test_steps_past_one_epoch_are_measured_exactly(real_data: None, cli, tmp_path) -> None:
    """Batch 8192 gives 6 full batches an epoch: 7 steps span two epochs, and all are measured."""
    import json

    out = tmp_path / "bench.json"
    args = ("--batch-size", "8192", "--steps", "6", "--warmup-steps", "1", "--eval-batch-size", "2500")
    code, _, err = cli("bench", "--paths", "fmnist", *args, "--json", out)
    assert code == 0, err
    assert json.loads(out.read_text())["config"]["steps"] == 6  # the timer asserts it counted 1 + 6
