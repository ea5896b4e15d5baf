"""The pool, balloon goals, swap amounts, balloon progress, and untrusted guest reports."""

from __future__ import annotations

import pytest

from hv.policy.guest import (
    HIDDEN_MIN_READINGS,
    GuestReport,
    HiddenEstimate,
    NEED_RISE_BYTES,
    NeedTrend,
    check_report,
    hidden_bound_bytes,
)
from hv.policy.reclaim import (
    BALLOON_STUCK_S,
    SWAP_MAX_PAGES_PER_TICK,
    BalloonProgress,
    balloon_goal,
    policy_active_fraction,
    pool_bytes,
    pool_free_bytes,
    swap_pages_for,
)
from hv.units import GiB, MiB, PAGE_SIZE

FLOOR = 128 * MiB


def test_pool_free_is_the_tighter_of_host_and_managed_bound() -> None:
    assert pool_free_bytes(10 * MiB, 500 * MiB, 100 * MiB) == 10 * MiB
    assert pool_free_bytes(20_000 * MiB, 500 * MiB, 420 * MiB) == 80 * MiB
    assert pool_free_bytes(20_000 * MiB, 500 * MiB, 600 * MiB) == 0


def test_pool_is_what_vms_hold_plus_free_above_the_goal() -> None:
    high = 1440 * MiB  # 6 % of 24 GiB (the goal also adds the hysteresis)
    # The case: 3 GiB of guests hold 1.9 GiB, 737 MiB free: the pool is smaller
    # than what they hold by exactly what must be reclaimed.
    held = 1894 * MiB
    assert pool_bytes(held, 737 * MiB, high, 24 * GiB) == held - (high - 737 * MiB)
    # Plenty free: the VMs may grow into the surplus, up to the managed bound.
    assert pool_bytes(held, 20 * GiB, high, 24 * GiB) == held + 20 * GiB - high
    assert pool_bytes(held, 20 * GiB, high, 3 * GiB) == 3 * GiB
    assert pool_bytes(0, 0, high, 24 * GiB) == 0  # never negative


def test_policy_active_fraction_scales_to_the_allocation() -> None:
    # 50 % of 10,000 sampleable pages is 5,000 active pages of a 20,000-page allocation.
    assert policy_active_fraction(0.5, 10_000, 20_000 * PAGE_SIZE) == pytest.approx(0.25)
    assert policy_active_fraction(1.0, 0, 256 * MiB) == 1.0  # unmeasured: all active
    assert policy_active_fraction(0.9, 30_000, 20_000 * PAGE_SIZE) == 1.0  # clamped


def test_balloon_goal_takes_the_excess_host_memory() -> None:
    # 1 GiB balloon, 722 MiB resident, target 300 MiB: give up 422 MiB.
    goal = balloon_goal(300 * MiB, GiB, GiB, 722 * MiB, FLOOR, need_bytes=100 * MiB)
    assert goal == GiB - 422 * MiB
    # Never below what the guest needs, nor below the floor.
    assert balloon_goal(300 * MiB, GiB, GiB, 722 * MiB, FLOOR, 700 * MiB) == 700 * MiB
    assert balloon_goal(50 * MiB, GiB, 200 * MiB, 200 * MiB, FLOOR, 10 * MiB) == FLOOR
    # No trustworthy report: the balloon does not shrink on a guess.
    assert balloon_goal(300 * MiB, GiB, GiB, 722 * MiB, FLOOR, None) == GiB


def test_balloon_goal_grows_back_to_target_and_keeps_max_in_every_case() -> None:
    assert balloon_goal(800 * MiB, GiB, 300 * MiB, 290 * MiB, FLOOR, None) == 800 * MiB
    # At or under target and the balloon already above it: stays.
    assert balloon_goal(600 * MiB, GiB, 900 * MiB, 400 * MiB, FLOOR, None) == 900 * MiB
    # max is a limit whatever the guest says or needs.
    assert balloon_goal(512 * MiB, 512 * MiB, GiB, 100 * MiB, FLOOR, None) == 512 * MiB
    assert balloon_goal(512 * MiB, 512 * MiB, GiB, 900 * MiB, FLOOR, 900 * MiB) == 512 * MiB


def test_swap_pages_for() -> None:
    assert swap_pages_for(100 * MiB, 98 * MiB) == 0  # within slack
    assert swap_pages_for(120 * MiB, 100 * MiB) == 20 * MiB // PAGE_SIZE
    assert swap_pages_for(1024 * MiB, 100 * MiB) == SWAP_MAX_PAGES_PER_TICK


def test_balloon_progress_sees_a_stuck_balloon_and_a_floor() -> None:
    p = BalloonProgress()
    target, resident = 300 * MiB, 700 * MiB
    # A balloon asked to 600 MiB that never moves from 1 GiB (no driver, no answer).
    p.update(0.0, 600 * MiB, GiB)
    assert not p.cannot_reach(1.0, target, resident)
    p.update(BALLOON_STUCK_S / 2, 600 * MiB, GiB)
    assert not p.cannot_reach(BALLOON_STUCK_S / 2, target, resident)
    p.update(BALLOON_STUCK_S + 1, 600 * MiB, GiB)
    assert p.cannot_reach(BALLOON_STUCK_S + 1, target, resident)
    # A moving balloon is not stuck: progress restarts the clock.
    p.update(BALLOON_STUCK_S + 2, 600 * MiB, 900 * MiB)
    assert not p.cannot_reach(BALLOON_STUCK_S + 3, target, resident)
    # At its goal but still above target for a while: the goal stopped at the floor.
    q = BalloonProgress()
    q.update(0.0, 600 * MiB, 600 * MiB)
    assert not q.cannot_reach(1.0, target, resident)
    q.update(BALLOON_STUCK_S, 600 * MiB, 600 * MiB)
    assert q.cannot_reach(BALLOON_STUCK_S, target, resident)
    # At target: nothing to reach.
    assert not q.cannot_reach(BALLOON_STUCK_S, target, target)
    # A new goal restarts the clock.
    q.update(BALLOON_STUCK_S + 1, 400 * MiB, 600 * MiB)
    assert not q.cannot_reach(BALLOON_STUCK_S + 2, target, resident)


def report(total_mib: int | None, available_mib: int | None, free_mib: int | None = None,
           age_s: float | None = 1.0) -> GuestReport:
    def b(v: int | None) -> int | None:
        return None if v is None else v * MiB
    return GuestReport(b(total_mib), b(free_mib), b(available_mib), age_s)


@pytest.mark.parametrize("r, why", [
    (report(217, 100, age_s=None), "no statistics"),
    (report(217, 100, age_s=9.0), "old"),
    (report(None, 100), "without MemTotal"),
    (report(0, 0), "MemTotal is 0"),
    (report(4096, 100), "above the VM's"),
    (report(217, 300), "available"),
    (report(217, 100, free_mib=-1), "free"),
    (report(240, 100), "above the guest's"),  # MemTotal above the ballooned size
    (report(40, 10), "implausibly far below"),
])
def test_impossible_or_stale_reports_are_rejected(r: GuestReport, why: str) -> None:
    problem = check_report(r, 256 * MiB, 200 * MiB, False, 3.0)
    assert problem is not None and why in problem


def test_a_plausible_report_is_accepted() -> None:
    assert check_report(report(160, 100, 90), 256 * MiB, 200 * MiB, False, 3.0) is None
    # With deflate-on-oom MemTotal stays near the VM's size whatever the balloon.
    assert check_report(report(217, 100), 256 * MiB, 128 * MiB, True, 3.0) is None


def test_no_single_report_moves_the_boot_reserve() -> None:
    h = HiddenEstimate()
    ram = 256 * MiB
    for _ in range(HIDDEN_MIN_READINGS - 1):
        h.add(256 * MiB, 217 * MiB, ram)
    assert h.bytes is None  # not enough readings yet
    h.add(256 * MiB, 217 * MiB, ram)
    assert h.bytes == 39 * MiB
    h.add(256 * MiB, 1 * MiB, ram)  # one lying report (MemTotal tiny)
    assert h.bytes == 39 * MiB
    # Even a run of lies is bounded.
    for _ in range(10):
        h.add(256 * MiB, 0, ram)
    assert h.bytes == hidden_bound_bytes(ram)


def test_need_is_given_only_once_the_guest_stopped_growing() -> None:
    t = NeedTrend()
    t.add(100.0, 300 * MiB)
    assert t.settled_bytes is None  # one report says nothing of a trend
    t.add(100.0, 310 * MiB)  # the same report again (hidden estimate moved)
    assert t.settled_bytes is None
    t.add(102.0, 400 * MiB)  # a guest still filling its memory (a relaunched hog)
    assert t.settled_bytes is None
    t.add(104.0, 400 * MiB + NEED_RISE_BYTES)  # growth within the tolerance: settled
    assert t.settled_bytes == 400 * MiB + NEED_RISE_BYTES
    t.add(106.0, 380 * MiB)  # use that falls is settled; the floor is the larger of the two
    assert t.settled_bytes == 400 * MiB + NEED_RISE_BYTES
    t.add(108.0, None)  # a rejected or missing report starts over
    assert t.settled_bytes is None
    t.add(110.0, 380 * MiB)
    assert t.settled_bytes is None


def test_a_guest_claiming_endless_growth_keeps_its_balloon_and_no_more() -> None:
    t = NeedTrend()
    for i in range(10):
        t.add(float(i * 2), (200 + i * 100) * MiB)
    assert t.settled_bytes is None
    # No need known: the balloon does not shrink, and never grows past the target.
    assert balloon_goal(300 * MiB, GiB, 700 * MiB, 700 * MiB, FLOOR, t.settled_bytes) == 700 * MiB
