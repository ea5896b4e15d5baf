"""Working-set estimator (hv.policy.estimator)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.errors import StateFileError
from hv.policy.estimator import FAST_GAIN, SLOW_GAIN, WorkingSetEstimator


def test_unmeasured_vm_counts_as_all_active() -> None:
    est = WorkingSetEstimator()
    assert est.active_fraction == 1.0
    assert est.slow is None and est.fast is None and est.current is None


def test_first_period_seeds_both_averages() -> None:
    est = WorkingSetEstimator()
    assert est.update(touched=30, sampled=100) == pytest.approx(0.3)
    assert est.slow == est.fast == est.current == pytest.approx(0.3)
    assert est.periods == 1


def test_uninvalidated_pages_are_left_out_of_the_fraction() -> None:
    est = WorkingSetEstimator()
    # 100 picked, 20 could not be invalidated: 40 of the 80 sampled were touched.
    est.update(touched=40, sampled=80)
    assert est.current == pytest.approx(0.5)


def test_a_period_with_nothing_sampled_gives_no_estimate() -> None:
    est = WorkingSetEstimator()
    est.update(20, 100)
    before = est.to_dict()
    assert est.update(0, 0) == pytest.approx(0.2)
    assert est.to_dict() == before


def test_fast_average_follows_an_increase_within_two_periods() -> None:
    est = WorkingSetEstimator()
    for _ in range(20):
        est.update(10, 100)
    est.update(90, 100)
    est.update(90, 100)
    assert est.fast is not None and est.slow is not None
    # Three quarters of the 0.1 -> 0.9 step after two periods ...
    assert est.fast >= 0.1 + 0.75 * 0.8 - 1e-9
    # ... while the slow average has barely moved.
    assert est.slow < 0.3
    # The active fraction follows the fast average.
    assert est.active_fraction == pytest.approx(est.fast)


def test_slow_average_lags_a_decrease() -> None:
    est = WorkingSetEstimator()
    for _ in range(30):
        est.update(90, 100)
    for _ in range(5):
        est.update(10, 100)
    assert est.fast is not None and est.slow is not None
    assert est.fast < 0.15         # the fast average knows the VM went idle ...
    assert est.slow > 0.5          # ... the slow one still holds the memory for it
    assert est.active_fraction == est.slow


def test_converges_on_a_steady_noisy_working_set() -> None:
    rng = random.Random(7)
    est = WorkingSetEstimator()
    true_f = 0.35
    for _ in range(200):
        sampled = 100 - rng.randrange(10)  # a few pages could not be invalidated
        touched = sum(rng.random() < true_f for _ in range(sampled))
        est.update(touched, sampled)
    assert est.slow == pytest.approx(true_f, abs=0.04)
    assert est.fast == pytest.approx(true_f, abs=0.12)


def test_active_fraction_is_the_max_of_the_three() -> None:
    est = WorkingSetEstimator()
    for touched in (50, 80, 20):
        for partial in (0, touched // 2, touched):
            est.observe_partial(partial, 100)
            values = [est.slow, est.fast, est.in_period]
            expected = max(v for v in values if v is not None) if est.periods else 1.0
            assert est.active_fraction == expected
        est.update(touched, 100)
        assert est.in_period is None
        assert est.active_fraction == max(est.slow or 0, est.fast or 0)


def test_in_period_estimate_is_the_fast_average_with_the_partial_sample() -> None:
    est = WorkingSetEstimator()
    for _ in range(10):
        est.update(10, 100)
    fast = est.fast
    assert fast is not None
    assert est.observe_partial(60, 100) == pytest.approx(fast + FAST_GAIN * (0.6 - fast))
    assert est.in_period == pytest.approx(fast + FAST_GAIN * (0.6 - fast))


def test_growth_shows_before_the_period_ends() -> None:
    est = WorkingSetEstimator()
    for _ in range(20):
        est.update(10, 100)
    before = est.active_fraction
    # The working set grew to 90%: touched-so-far climbs during the period.
    rising = [est.observe_partial(t, 100) for t in (5, 20, 50, 80, 90)]
    assert rising == sorted(rising)
    assert rising[-1] > before + 0.35
    # The period's full update replaces the in-period estimate with the same value.
    assert est.update(90, 100) == pytest.approx(rising[-1])
    assert est.in_period is None


def test_a_partial_count_never_lowers_the_active_fraction() -> None:
    # Touched-so-far is a lower bound: early in a period it is low for any VM.
    est = WorkingSetEstimator()
    for _ in range(30):
        est.update(80, 100)
    before = est.active_fraction
    for t in (0, 10, 40):
        assert est.observe_partial(t, 100) == pytest.approx(before)


def test_a_partial_count_before_the_first_period_keeps_the_vm_unmeasured() -> None:
    est = WorkingSetEstimator()
    assert est.observe_partial(3, 100) == 1.0
    assert est.in_period == pytest.approx(0.03)
    assert est.periods == 0 and est.slow is None
    est.update(40, 100)
    assert est.in_period is None and est.active_fraction == pytest.approx(0.4)


def test_a_discarded_period_clears_its_partial_estimate() -> None:
    est = WorkingSetEstimator()
    est.update(10, 100)
    est.observe_partial(90, 100)
    assert est.active_fraction > 0.4
    est.clear_partial()
    assert est.in_period is None and est.active_fraction == pytest.approx(0.1)


def test_partial_counts_with_nothing_sampled_change_nothing() -> None:
    est = WorkingSetEstimator()
    est.update(20, 100)
    assert est.observe_partial(0, 0) == pytest.approx(0.2)
    assert est.in_period is None


def test_in_period_estimate_is_not_persisted() -> None:
    est = WorkingSetEstimator()
    est.update(20, 100)
    est.observe_partial(90, 100)
    data = est.to_dict()
    assert data["format"] == 1 and "in_period" not in data
    again = WorkingSetEstimator.from_dict(json.loads(json.dumps(data)))
    assert again.in_period is None and again.active_fraction == pytest.approx(0.2)


def test_state_saved_before_in_period_estimates_still_loads() -> None:
    # The format-1 layout written by hv before the in-period estimate existed.
    old = {"format": 1, "fast_gain": 0.5, "slow_gain": 0.1, "slow": 0.25, "fast": 0.3,
           "current": 0.35, "periods": 7}
    est = WorkingSetEstimator.from_dict(old)
    assert est.periods == 7 and est.active_fraction == pytest.approx(0.3)
    assert est.to_dict() == old


def test_default_gains() -> None:
    assert 0 < SLOW_GAIN < FAST_GAIN <= 1
    est = WorkingSetEstimator()
    assert (est.slow_gain, est.fast_gain) == (SLOW_GAIN, FAST_GAIN)


@pytest.mark.parametrize(("touched", "sampled"), [(-1, 10), (11, 10), (0, -1), (1, 0)])
def test_impossible_counts_are_refused(touched: int, sampled: int) -> None:
    with pytest.raises(ValueError):
        WorkingSetEstimator().update(touched, sampled)
    with pytest.raises(ValueError):
        WorkingSetEstimator().observe_partial(touched, sampled)


def test_bad_gains_are_refused() -> None:
    with pytest.raises(ValueError):
        WorkingSetEstimator(fast_gain=0.1, slow_gain=0.5)
    with pytest.raises(ValueError):
        WorkingSetEstimator(fast_gain=1.5)


def test_round_trip_through_json() -> None:
    est = WorkingSetEstimator()
    for touched in (10, 60, 30):
        est.update(touched, 100)
    again = WorkingSetEstimator.from_dict(json.loads(json.dumps(est.to_dict())))
    assert again.to_dict() == est.to_dict()
    assert again.update(40, 100) == est.update(40, 100)


def test_fresh_estimator_round_trips() -> None:
    again = WorkingSetEstimator.from_dict(WorkingSetEstimator().to_dict())
    assert again.active_fraction == 1.0 and again.periods == 0


@pytest.mark.parametrize(
    "change",
    [
        {"format": 99},
        {"slow": 1.5},
        {"fast": "x"},
        {"periods": -1},
        {"periods": True},
        {"slow": None},        # averages missing while periods > 0
        {"slow_gain": 0.9, "fast_gain": 0.1},
    ],
)
def test_corrupt_state_is_a_state_file_error(change: dict[str, object]) -> None:
    est = WorkingSetEstimator()
    est.update(10, 100)
    data = {**est.to_dict(), **change}
    with pytest.raises(StateFileError):
        WorkingSetEstimator.from_dict(data)


def test_missing_key_is_a_state_file_error() -> None:
    data = WorkingSetEstimator().to_dict()
    del data["fast"]
    with pytest.raises(StateFileError):
        WorkingSetEstimator.from_dict(data)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=50))
def test_estimates_stay_fractions(periods: list[tuple[int, int]]) -> None:
    est = WorkingSetEstimator()
    for a, b in periods:
        touched, sampled = min(a, b), max(a, b)
        before = est.active_fraction
        partial = est.observe_partial(touched // 2, sampled)
        assert before <= partial <= 1.0  # a partial count only raises
        f = est.update(touched, sampled)
        assert 0.0 <= f <= 1.0
        for v in (est.slow, est.fast, est.current, est.in_period):
            assert v is None or 0.0 <= v <= 1.0
