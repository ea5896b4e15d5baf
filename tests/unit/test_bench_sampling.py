"""hv bench sampling's analysis (pure): tracking error, lag and shapes on synthetic runs."""

from __future__ import annotations

from typing import Any

import pytest

from hv.bench.sampling import TRACK_POINTS, SamplingResult, analyse

SAMPLEABLE = 25_600  # 100 MiB of sampleable pages: 1 MiB of working set = 1 point


def period(start: float, end: float, fast: float, slow: float) -> dict[str, Any]:
    return {"start_s": start, "end_s": end, "discarded": None, "sampleable": SAMPLEABLE,
            "fast": fast, "slow": slow, "max": max(fast, slow), "sample": fast}


def test_growth_followed_and_shrink_lagging_by_the_slow_average() -> None:
    # 20 MiB for 40 s, 80 MiB for 40 s (fast follows), then 20 MiB (slow lags above).
    periods = [period(0, 10, 0.2, 0.2), period(10, 20, 0.2, 0.2), period(20, 30, 0.21, 0.2),
               period(30, 40, 0.2, 0.2),
               period(40, 50, 0.5, 0.26), period(50, 60, 0.66, 0.3), period(60, 70, 0.75, 0.35),
               period(70, 80, 0.79, 0.4),
               period(80, 90, 0.5, 0.42), period(90, 100, 0.35, 0.41), period(100, 110, 0.27, 0.40),
               period(110, 120, 0.23, 0.39)]
    partials = [{"t_s": 41.0, "max": 0.5, "in_period": 0.5}]  # in-period rise 1 s after growth
    res = SamplingResult({}, [(0.0, 20), (40.0, 80), (80.0, 20)], periods, partials)
    first, up, down = analyse(res, period_s=10.0)
    assert first["direction"] == "first" and first["shapes_hold"]
    assert first["steady_mean_err_pts"] == pytest.approx(0.5)
    assert up["direction"] == "up" and up["lag_half_step_s"] == pytest.approx(1.0)
    assert up["lag_to_within_s"] == pytest.approx(20.0)  # 0.66 vs 0.80: first within 15 points
    assert up["shapes_hold"] and up["steady_worst_err_pts"] == pytest.approx(5.0)
    assert down["direction"] == "down" and not down["shapes_hold"]
    assert down["steady_worst_err_pts"] > TRACK_POINTS  # the slow average's 0.40 vs 0.20
    assert "steady-state" in down["misses"][0]
    assert res.phases == [] and not all(p["shapes_hold"] for p in (first, up, down))


def test_growth_missed_when_nothing_rises_within_a_period() -> None:
    periods = [period(0, 10, 0.2, 0.2), period(10, 20, 0.2, 0.2), period(20, 30, 0.2, 0.2),
               period(30, 40, 0.9, 0.3), period(40, 50, 0.9, 0.4), period(50, 60, 0.9, 0.5)]
    res = SamplingResult({}, [(0.0, 20), (20.0, 90)], periods, [])
    _, up = analyse(res, period_s=5.0)  # the first rise shows 20 s after the change
    assert up["lag_half_step_s"] == pytest.approx(20.0)
    assert "growth not followed within one period (half the step)" in up["misses"]
