"""The policy for any inputs: targets within [min, max] adding up within the pool, states
and actions consistent with free memory, admission within what exists, no NaN anywhere.

The inputs are what the daemon can hand the policy (hv/daemon/loop.py, ``tick``): sizes
within a C long (the config's range), shares >= 1, any estimate the sampler or a saved
estimator file may produce (NaN and infinities included), any free-memory reading.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from hv.errors import AdmissionError, StateFileError
from hv.policy import (
    AdmissionControl,
    MemState,
    StateTracker,
    Thresholds,
    VMDemand,
    WorkingSetEstimator,
    actions_for,
    compute_targets,
    overhead_bytes,
    share_before_swap,
    should_pause,
)
from hv.policy.reclaim import (
    SWAP_MAX_PAGES_PER_TICK,
    balloon_goal,
    policy_active_fraction,
    pool_bytes,
    pool_free_bytes,
    swap_pages_for,
)
from hv.units import MAX_SIZE_BYTES, PAGE_SIZE
from tests.property.conftest import examples, one_line

MiB = 1024 * 1024

# Sizes as the config allows them; most in the range real VMs have, some at the edges.
sizes = st.one_of(st.integers(0, 64 * 1024 * MiB), st.integers(0, MAX_SIZE_BYTES),
                  st.sampled_from([0, 1, PAGE_SIZE - 1, PAGE_SIZE, MAX_SIZE_BYTES]))
any_float = st.floats(allow_nan=True, allow_infinity=True)
estimates = st.one_of(st.floats(0.0, 1.0), any_float)
shares = st.one_of(st.integers(1, 10**6), st.integers(1, MAX_SIZE_BYTES))
tax_rates = st.one_of(st.floats(0.0, 0.99), st.sampled_from([0.0, 0.75, 0.999999]))
any_int = st.one_of(st.integers(-2 * MAX_SIZE_BYTES, 2 * MAX_SIZE_BYTES), sizes)


@st.composite
def demands(draw: st.DrawFn) -> list[VMDemand]:
    """VMs as the daemon builds them: bounds from the config, the active fraction through
    policy_active_fraction from whatever the estimator said."""
    out = []
    for i in range(draw(st.integers(1, 8))):
        lo, hi = sorted((draw(sizes), draw(sizes)))
        allocated = draw(sizes)
        f = policy_active_fraction(draw(estimates), draw(st.integers(-5, 10**7)),
                                   min(allocated, hi))
        out.append(VMDemand(f"vm{i}", draw(shares), lo, hi, min(allocated, hi), f))
    return out


@settings(max_examples=examples("pure"))
@given(estimates, st.integers(-(2**40), 2**40), st.integers(-(2**40), MAX_SIZE_BYTES))
def test_active_fraction_is_a_fraction(estimate: float, measured: int, allocated: int) -> None:
    f = policy_active_fraction(estimate, measured, allocated)
    assert isinstance(f, float) and 0.0 <= f <= 1.0  # NaN fails both comparisons


@settings(max_examples=examples("pure"))
@given(demands(), any_int, tax_rates)
def test_targets_within_bounds_and_pool(vms: list[VMDemand], pool: int, tax: float) -> None:
    targets = compute_targets(vms, pool, tax)
    assert set(targets) == {v.name for v in vms}
    for v in vms:
        t = targets[v.name]
        assert isinstance(t, int) and v.min_bytes <= t <= v.max_bytes, (v, t)
    total, mins, maxes = sum(targets.values()), sum(v.min_bytes for v in vms), sum(v.max_bytes for v in vms)
    if maxes <= pool:
        assert all(targets[v.name] == v.max_bytes for v in vms)
    elif mins >= pool:
        assert all(targets[v.name] == v.min_bytes for v in vms)  # a min is a guarantee
    else:
        assert total <= pool, (total, pool)
        # ...and little is left unused: at most a page per VM, or a min not page-aligned.
        assert pool - total <= PAGE_SIZE * len(vms) + sum(v.min_bytes % PAGE_SIZE for v in vms), (pool, total)


@settings(max_examples=examples("pure"))
@given(demands(), st.integers(0, MAX_SIZE_BYTES), st.integers(1, 64 * MiB), tax_rates)
def test_more_memory_never_lowers_a_target(vms: list[VMDemand], pool: int, more: int, tax: float) -> None:
    before = compute_targets(vms, pool, tax)
    after = compute_targets(vms, pool + more, tax)
    # Water filling: every VM's target is monotone in the pool (to within the page
    # rounding of the last step, which takes back at most a page per VM).
    assert all(after[n] >= before[n] - PAGE_SIZE * len(vms) for n in before), (before, after)


@settings(max_examples=examples("pure"))
@given(sizes, sizes, sizes, sizes, st.one_of(st.floats(0, 1e12), st.integers(0, 2**40)), any_int)
def test_pool_is_never_negative_nor_over_its_bound(available: int, managed: int, used: int,
                                                   held: int, goal: float, bound: int) -> None:
    free = pool_free_bytes(available, managed, used)
    assert 0 <= free <= available
    pool = pool_bytes(held, free, goal, bound)
    assert isinstance(pool, int) and 0 <= pool <= max(0, bound)


@settings(max_examples=examples("pure"))
@given(sizes, sizes, sizes, sizes, sizes, st.one_of(st.none(), sizes))
def test_balloon_goal_within_zero_and_max(target: int, max_b: int, balloon: int, resident: int,
                                          floor: int, need: int | None) -> None:
    goal = balloon_goal(target, max_b, balloon, resident, floor, need)
    assert isinstance(goal, int) and 0 <= goal <= max_b
    if goal < min(balloon, max_b):  # reclaiming (not just down to max): floor and need hold
        assert need is not None and goal >= max(floor, need)
    pages = swap_pages_for(resident, target)
    assert 0 <= pages <= SWAP_MAX_PAGES_PER_TICK
    assert pages == 0 or resident > target


@st.composite
def thresholds(draw: st.DrawFn) -> Thresholds:
    cuts = sorted(draw(st.lists(st.floats(0.01, 90.0), min_size=4, max_size=4, unique=True)),
                  reverse=True)
    return Thresholds(*cuts)


@settings(max_examples=examples("pure"))
@given(st.integers(1, MAX_SIZE_BYTES), thresholds(), st.floats(0.0, 9.0),
       st.lists(st.integers(0, MAX_SIZE_BYTES), min_size=1, max_size=30))
def test_state_follows_free_memory(managed: int, th: Thresholds, hyst: float, readings: list[int]) -> None:
    assume(hyst < 100 - th.high_pct)
    tracker = StateTracker(managed, th, hyst)
    for free in readings:
        before = tracker.state
        state = tracker.update(free)
        # Never better than what free memory allows: below a threshold means that state or worse.
        for s in MemState:
            if s > MemState.HIGH and free < tracker.threshold_bytes(s):
                assert state >= s
        # A better state only once free memory is above its threshold plus the hysteresis.
        if state < before:
            assert free > tracker.threshold_bytes(state) + managed * hyst / 100
        assert 0 <= tracker.shortfall_bytes(free) and math.isfinite(tracker.free_goal_bytes())
        acts = actions_for(state)
        assert acts.swap <= acts.balloon and acts.pause_above_target <= acts.swap
        assert acts.pause_above_target == (state == MemState.LOW)


@settings(max_examples=examples("pure"))
@given(st.sampled_from(list(MemState)), sizes, sizes, st.integers(0, 64 * MiB),
       st.integers(0, 2**40), st.integers(0, 2**40), st.floats(0.0, 1e6))
def test_pause_and_swap_deferral_only_where_the_paper_says(state: MemState, held: int, target: int,
                                                           slack: int, unrealized: int,
                                                           shortfall: int, deferred: float) -> None:
    if should_pause(state, held, target, slack):
        assert state == MemState.LOW and held > target + slack
    advice = share_before_swap(state, unrealized, shortfall, deferred)
    assert not advice.defer_swap or state == MemState.HARD
    assert not advice.raise_ksm_rate or state >= MemState.SOFT


@settings(max_examples=examples("pure"))
@given(st.integers(1, MAX_SIZE_BYTES), st.integers(0, MAX_SIZE_BYTES),
       st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), sizes, sizes,
                          st.sampled_from(["admit", "admit", "release"])), max_size=12))
def test_admission_never_reserves_more_than_exists(managed: int, swap: int,
                                                   steps: list[tuple[str, int, int, str]]) -> None:
    ac = AdmissionControl(managed, swap)
    for name, a, b, op in steps:
        lo, hi = sorted((a, b))
        try:
            if op == "admit":
                r = ac.admit(name, lo, hi)
                assert r.memory_bytes == lo + overhead_bytes(hi) and r.swap_bytes == hi - lo
            else:
                ac.release(name)
        except AdmissionError as exc:
            one_line(exc)
        assert ac.unreserved_memory_bytes >= 0 and ac.unreserved_swap_bytes >= 0
        assert len({r.name for r in ac.admitted}) == len(ac.admitted)


@settings(max_examples=examples("pure"))
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.booleans()), max_size=40))
def test_estimator_stays_a_fraction(observations: list[tuple[int, int, bool]]) -> None:
    est = WorkingSetEstimator()
    for a, b, partial in observations:
        touched, sampled = sorted((a, b))
        f = est.observe_partial(touched, sampled) if partial else est.update(touched, sampled)
        assert 0.0 <= f <= 1.0
    again = WorkingSetEstimator.from_dict(est.to_dict())
    assert again.slow == est.slow and again.fast == est.fast and again.periods == est.periods


saved_values = st.one_of(st.none(), st.booleans(), any_float, st.integers(-2, 2),
                         st.sampled_from([10**400, -(10**400), 2**63]), st.text(max_size=4),
                         st.lists(st.integers(), max_size=2))


@settings(max_examples=examples("pure"))
@given(st.one_of(
    st.fixed_dictionaries({"format": st.sampled_from([1, 1, 1, 2, "1"]),
                           "fast_gain": st.one_of(st.just(0.5), saved_values),
                           "slow_gain": st.one_of(st.just(0.1), saved_values),
                           "slow": st.one_of(st.floats(0, 1), saved_values),
                           "fast": st.one_of(st.floats(0, 1), saved_values),
                           "current": st.one_of(st.floats(0, 1), saved_values),
                           "periods": st.one_of(st.integers(0, 5), saved_values)}),
    st.dictionaries(st.text(max_size=8), saved_values, max_size=4)))
@example({"format": 1, "fast_gain": 10**400, "slow_gain": 0.1, "slow": None, "fast": None,
          "current": None, "periods": 0})  # found here: OverflowError, not StateFileError
def test_saved_estimator_loads_as_a_fraction_or_one_error(data: dict[str, Any]) -> None:
    """A corrupt or hand-edited estimator.json: a StateFileError line or a sane estimator."""
    try:
        est = WorkingSetEstimator.from_dict(data)
    except StateFileError as exc:
        one_line(exc)
        return
    f = est.active_fraction
    assert 0.0 <= f <= 1.0
    assert 0.0 < est.slow_gain <= est.fast_gain <= 1.0
