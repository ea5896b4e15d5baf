"""The soak's verdicts (tests.soak.analysis) on made-up recordings: fast, no host."""

from __future__ import annotations

from tests.soak.analysis import (
    FD_TOLERANCE,
    Kill,
    MiB,
    PAUSE_RELEASE_S,
    RSS_TOLERANCE_BYTES,
    ResourceSample,
    StallSample,
    console_problems,
    failures,
    growth,
    late_ticks,
    pauses,
)


def stalls(mem_full_s: float = 0.0, runq_s: float = 0.0) -> list[StallSample]:
    """The host stalled ``mem_full_s`` and hv waited ``runq_s`` between t=10 and t=20."""
    return [StallSample(0.0, 0, 0), StallSample(10.0, 0, 0),
            StallSample(20.0, int(mem_full_s * 1e6), int(runq_s * 1e9))]


def test_a_tick_late_by_more_than_the_stall_is_not_excused() -> None:
    ticks = [9.0, 10.0, 13.5, 14.5]  # one interval of 3.5 s: 1.5 s late at a 1 s poll
    got = late_ticks(ticks, 1.0, stalls(mem_full_s=1.0))
    assert got["late"] == 1 and got["late_unexcused"] == 1
    assert got["worst_delay_s"] == 2.5


def test_a_tick_late_while_the_host_stalled_is_excused() -> None:
    for s in (stalls(mem_full_s=1.6), stalls(runq_s=1.6)):
        got = late_ticks([9.0, 10.0, 13.5, 14.5], 1.0, s)
        assert got["late"] == 1 and got["late_excused"] == 1 and got["late_unexcused"] == 0


def test_ticks_on_schedule_are_not_late() -> None:
    got = late_ticks([float(t) for t in range(100)] + [100.9], 1.0, stalls())
    assert got["late"] == 0 and got["ticks"] == 101


def test_a_pause_outside_low_or_held_after_low_is_a_mistake() -> None:
    events = [
        {"ts": 1, "event": "state", "state": "low"},
        {"ts": 2, "event": "pause", "vm": "a"},
        {"ts": 3, "event": "state", "state": "hard"},
        {"ts": 4, "event": "tick", "vm": "a", "paused_by_hv": True},
        {"ts": 3 + PAUSE_RELEASE_S + 1, "event": "tick", "vm": "a", "paused_by_hv": True},
        {"ts": 12, "event": "resume", "vm": "a"},
        {"ts": 13, "event": "pause", "vm": "b"},
    ]
    got = pauses(events, still_paused=["c"])
    whys = [(m["vm"], m["why"].split()[0]) for m in got["mistakes"]]
    assert whys == [("a", "still"), ("b", "paused"), ("c", "paused")]
    assert got["pauses"] == 2 and got["resumes"] == 1 and got["longest_pause_s"] == 10


def test_a_pause_released_when_low_ends_is_fine() -> None:
    events = [{"ts": 1, "event": "state", "state": "low"}, {"ts": 2, "event": "pause", "vm": "a"},
              {"ts": 3, "event": "state", "state": "hard"}, {"ts": 3.5, "event": "resume", "vm": "a"},
              {"ts": 4, "event": "tick", "vm": "a", "paused_by_hv": False}]
    assert pauses(events, [])["mistakes"] == []


def test_failures_of_a_killed_vm_are_explained_and_others_are_not() -> None:
    kill = Kill("a", t_kill=100.0, t_gone=101.0, t_relaunched=104.0, t_reattached=106.0)
    events = [{"ts": 102, "event": "collect_failed", "vm": "a", "error": "gone"},
              {"ts": 200, "event": "act_failed", "vm": "a", "error": "balloon"},
              {"ts": 102, "event": "act_failed", "vm": "b", "error": "balloon"},
              {"ts": 102, "event": "balloon", "vm": "b"},
              {"ts": 103, "event": "share_failed", "error": "a: process 18231 does not exist"}]
    got = failures(events, [kill])
    assert got["total"] == 4 and got["unexplained"] == 2
    assert got["by_event"] == {"collect_failed": 1, "act_failed": 2, "share_failed": 1}


def test_console_oom_and_dead_workloads_are_found() -> None:
    got = console_problems({
        "a": ["hv-guest: event=workload_exit workload=hog status=0\n"],
        "b": ["[ 12.0] toucher invoked oom-killer: gfp_mask=0x0\n",
              "hv-guest: event=workload_exit workload=toucher status=137\n"],
    })
    assert list(got) == ["b"]
    assert got["b"] == ["invoked oom-killer", "workload toucher exited with status 137"]


def samples(rss_mib: list[float], fds: list[int]) -> list[ResourceSample]:
    return [ResourceSample(float(i), int(r * MiB), f, i * 0.01, 1000 * i)
            for i, (r, f) in enumerate(zip(rss_mib, fds))]


def test_flat_rss_and_fds_pass_and_growth_fails() -> None:
    n = 60
    flat = growth(samples([100.0 + (i % 3) for i in range(n)], [30 + i % 2 for i in range(n)]))
    assert flat["judged"] and flat["rss_flat"] and flat["fds_flat"]
    leak_mib = RSS_TOLERANCE_BYTES / MiB * 2 / n
    leaking = growth(samples([100.0 + i * leak_mib * 2 for i in range(n)],
                             [30 + i * (FD_TOLERANCE + 1) // 20 for i in range(n)]))
    assert not leaking["rss_flat"] and not leaking["fds_flat"]


def test_fds_open_for_a_moment_are_not_a_leak() -> None:
    # A sample taken mid-tick or during a reconnect sees a few more; the floor stays.
    fds = [33] * 60
    fds[50] = 33 + FD_TOLERANCE + 5
    assert growth(samples([100.0] * 60, fds))["fds_flat"]


def test_growth_during_the_warm_up_is_not_judged() -> None:
    rss = [50.0 + i * 10 for i in range(30)] + [350.0] * 30  # the heap fills once, then stays
    got = growth(samples(rss, [30] * 60), t_warm=30.0)
    assert got["rss_flat"] and got["warm_up_s"] == 30.0
    assert not growth(samples(rss, [30] * 60), t_warm=0.0)["rss_flat"]
