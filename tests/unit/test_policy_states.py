"""Free-memory states, actions and share before swap (hv.policy.states)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.policy.states import (
    MAX_SWAP_DEFER_S,
    MIN_UNREALIZED_SHARING_PAGES,
    Actions,
    MemState,
    StateTracker,
    Thresholds,
    actions_for,
    share_before_swap,
    should_pause,
)

MANAGED = 10_000 * 4096  # 1 % of managed memory is 100 pages: easy arithmetic


def pct(x: float) -> int:
    """``x`` percent of MANAGED, in bytes."""
    return round(MANAGED * x / 100)


def tracker(hysteresis_pct: float = 0.5) -> StateTracker:
    return StateTracker(MANAGED, Thresholds(), hysteresis_pct)


def test_starts_high_and_stays_high_with_plenty_free() -> None:
    t = tracker()
    assert t.state is MemState.HIGH
    assert t.update(pct(50)) is MemState.HIGH


@pytest.mark.parametrize(
    ("free_pct", "state"),
    [(7, MemState.HIGH), (5, MemState.HIGH), (3.9, MemState.SOFT), (1.9, MemState.HARD),
     (0.9, MemState.LOW), (0, MemState.LOW)],
)
def test_first_reading_falls_to_the_state_whose_threshold_it_is_below(
        free_pct: float, state: MemState) -> None:
    assert tracker().update(pct(free_pct)) is state


def test_falling_free_memory_walks_down_the_states() -> None:
    t = tracker()
    seen = [t.update(pct(x)) for x in (8, 6, 4.5, 3.9, 3, 2.1, 1.9, 1.5, 0.99, 0.5)]
    assert seen == [
        MemState.HIGH, MemState.HIGH, MemState.HIGH,   # 8, 6, 4.5: not below soft
        MemState.SOFT, MemState.SOFT, MemState.SOFT,   # 3.9, 3, 2.1
        MemState.HARD, MemState.HARD,                  # 1.9, 1.5
        MemState.LOW, MemState.LOW,                    # 0.99, 0.5
    ]


def test_leaving_a_state_needs_the_better_threshold_plus_hysteresis() -> None:
    t = tracker(hysteresis_pct=0.5)
    assert t.update(pct(0.5)) is MemState.LOW
    assert t.update(pct(1.5)) is MemState.LOW     # above low (1) but not hard + h
    assert t.update(pct(2.4)) is MemState.LOW     # above hard (2) but not 2.5
    assert t.update(pct(2.6)) is MemState.HARD    # hard + h exceeded
    assert t.update(pct(4.4)) is MemState.HARD
    assert t.update(pct(4.6)) is MemState.SOFT
    assert t.update(pct(6.4)) is MemState.SOFT    # between soft and high + h: stays
    assert t.update(pct(6.6)) is MemState.HIGH


def test_no_flapping_around_a_threshold() -> None:
    t = tracker(hysteresis_pct=0.5)
    t.update(pct(3.9))
    states = [t.update(pct(x)) for x in (4.1, 3.95, 4.2, 3.99, 4.4, 4.0)]
    assert states == [MemState.SOFT] * 6


def test_a_big_recovery_can_skip_states() -> None:
    t = tracker()
    t.update(0)
    assert t.update(pct(20)) is MemState.HIGH


def test_a_sudden_drop_goes_straight_to_low() -> None:
    t = tracker()
    t.update(pct(20))
    assert t.update(pct(0.2)) is MemState.LOW


def test_zero_hysteresis_still_has_the_gap_between_entry_and_exit() -> None:
    t = tracker(hysteresis_pct=0.0)
    t.update(pct(3.9))
    assert t.update(pct(5.9)) is MemState.SOFT
    assert t.update(pct(6.01)) is MemState.HIGH


def test_shortfall_is_what_brings_free_memory_back_to_high() -> None:
    t = tracker()
    assert t.shortfall_bytes(pct(2)) == pct(4)
    assert t.shortfall_bytes(pct(9)) == 0


def test_bad_tracker_arguments() -> None:
    with pytest.raises(ValueError):
        StateTracker(0)
    with pytest.raises(ValueError):
        StateTracker(MANAGED, Thresholds(), -1.0)
    with pytest.raises(ValueError):
        StateTracker(MANAGED, Thresholds(), 94.0)  # 6 + 94 = 100: high never reachable
    with pytest.raises(ValueError):
        Thresholds(6, 4, 4, 1)
    with pytest.raises(ValueError):
        Thresholds(6, 7, 2, 1)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.floats(0, 12), min_size=1, max_size=40))
def test_state_always_agrees_with_the_rules(readings: list[float]) -> None:
    t = tracker(hysteresis_pct=0.5)
    th = Thresholds()
    before = MemState.HIGH
    for x in readings:
        after = t.update(pct(x))
        free = pct(x)
        # Never in a better state than the entry rule allows ...
        for s in MemState:
            if s > after:
                assert free >= pct(th.pct(s))
        # ... and a better state is only reached past its threshold plus hysteresis.
        if after < before:
            assert free > pct(th.pct(after)) + pct(0.5) - 1
        before = after


# --- actions ---------------------------------------------------------------------


def test_actions_ladder() -> None:
    assert actions_for(MemState.HIGH) == Actions(balloon=False, swap=False,
                                                 pause_above_target=False)
    assert actions_for(MemState.SOFT) == Actions(True, False, False)
    assert actions_for(MemState.HARD) == Actions(True, True, False)
    assert actions_for(MemState.LOW) == Actions(True, True, True)
    # reclaim = "balloon": no state pages out; balloon and pause as before.
    assert [actions_for(s, hypervisor_swap=False) for s in MemState] == [
        Actions(False, False, False), Actions(True, False, False),
        Actions(True, False, False), Actions(True, False, True)]


def test_pause_only_in_low_and_only_above_target() -> None:
    assert should_pause(MemState.LOW, allocated_bytes=600, target_bytes=500)
    assert not should_pause(MemState.LOW, allocated_bytes=500, target_bytes=500)
    # Back in hard (or better): resume.
    assert not should_pause(MemState.HARD, allocated_bytes=600, target_bytes=500)
    assert not should_pause(MemState.HIGH, allocated_bytes=600, target_bytes=500)


def test_state_prints_lowercase() -> None:
    assert str(MemState.HARD) == "hard"


# --- share before swap ---------------------------------------------------------------

PLENTY = 10 * MIN_UNREALIZED_SHARING_PAGES


def test_high_state_never_pushes_ksm() -> None:
    advice = share_before_swap(MemState.HIGH, PLENTY, shortfall_pages=0)
    assert not advice.raise_ksm_rate and not advice.defer_swap


def test_soft_state_pushes_ksm_when_sharing_is_waiting() -> None:
    assert share_before_swap(MemState.SOFT, PLENTY, 100).raise_ksm_rate
    assert not share_before_swap(MemState.SOFT, PLENTY, 100).defer_swap
    assert not share_before_swap(MemState.SOFT, 10, 100).raise_ksm_rate


def test_hard_state_defers_swap_while_sharing_covers_the_shortfall() -> None:
    a = share_before_swap(MemState.HARD, PLENTY, shortfall_pages=PLENTY // 2)
    assert a.raise_ksm_rate and a.defer_swap
    # Sharing would not cover it: push KSM but swap anyway.
    b = share_before_swap(MemState.HARD, PLENTY, shortfall_pages=PLENTY * 2)
    assert b.raise_ksm_rate and not b.defer_swap
    # Waited long enough: swap.
    c = share_before_swap(MemState.HARD, PLENTY, PLENTY // 2, deferred_for_s=MAX_SWAP_DEFER_S)
    assert c.raise_ksm_rate and not c.defer_swap


def test_low_state_never_waits_for_sharing() -> None:
    a = share_before_swap(MemState.LOW, PLENTY, shortfall_pages=1)
    assert a.raise_ksm_rate and not a.defer_swap


def test_share_before_swap_refuses_negative_input() -> None:
    with pytest.raises(ValueError):
        share_before_swap(MemState.HARD, -1, 0)


def test_pause_uses_the_same_slack_as_swapping() -> None:
    from hv.policy.states import MemState, should_pause
    mib = 1 << 20
    assert should_pause(MemState.LOW, 200 * mib, 100 * mib, 4 * mib)
    assert not should_pause(MemState.LOW, 103 * mib, 100 * mib, 4 * mib)  # within slack
    assert should_pause(MemState.LOW, 103 * mib, 100 * mib)  # no slack given
    assert not should_pause(MemState.HARD, 200 * mib, 100 * mib, 4 * mib)


def test_free_goal_is_high_plus_hysteresis_so_reclaim_returns_to_high() -> None:
    from hv.policy.states import StateTracker
    t = StateTracker(1000 * 4096, hysteresis_pct=0.5)
    goal = t.free_goal_bytes()
    assert goal == pytest.approx(t.threshold_bytes(MemState.HIGH) + 5 * 4096)
    t.update(int(t.threshold_bytes(MemState.SOFT)) - 1)
    assert t.state is MemState.SOFT
    assert t.update(int(goal) + 1) is MemState.HIGH  # reaching the goal ends reclamation
