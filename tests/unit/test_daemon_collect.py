"""What one collection does to a VM's guest-need floor (``hv.daemon.collect._absorb``).

Pure bookkeeping on a VM record: the QEMU handle is a stand-in carrying only
``info``, since _absorb reads nothing else from it.  The real reports come from real
guests in tests/functional/test_pressure.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hv.daemon.collect import REPORT_MAX_AGE_S, _absorb
from hv.daemon.managed import Context, ManagedVM, Reading
from hv.policy import VMConfig, WorkingSetEstimator
from hv.qemu.vm import HEADROOM_BYTES, STATS_POLL_INTERVAL_S, GuestStats, VMInfo
from hv.units import MiB

RAM = 768 * MiB
TOTAL = 720 * MiB
USED = 70 * MiB


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def write(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def managed() -> ManagedVM:
    info = VMInfo(name="g", socket="/nonexistent", pid=2 ** 22 + 1, accel="tcg", ram_bytes=RAM,
                  ram=(), balloon_path="/machine/peripheral-anon/device[1]", deflate_on_oom=False)
    vm: Any = SimpleNamespace(info=info)
    return ManagedVM(cfg=VMConfig(name="g", min_bytes=160 * MiB), vm=vm, max_bytes=RAM,
                     estimator=WorkingSetEstimator(), estimator_file=Path("/nonexistent"),
                     pid=info.pid)


def reading(clock: WallClock, report_wall_s: float, now_wall_s: float) -> Reading:
    clock.now = now_wall_s
    g = GuestStats(total_bytes=TOTAL, free_bytes=TOTAL - USED, available_bytes=TOTAL - USED,
                   disk_caches_bytes=0, swap_in_bytes=0, swap_out_bytes=0, major_faults=0,
                   minor_faults=0, age_s=now_wall_s - report_wall_s)
    return Reading(balloon_bytes=RAM, resident_bytes=RAM, swap_bytes=0, run_state="running",
                   guest=g, at_s=time.monotonic())


class WallClock:
    """Stands in for the wall clock _absorb reads the report's time against."""

    def __init__(self, monkeypatch: Any) -> None:
        self.now = 1_800_000_000.0
        monkeypatch.setattr("hv.daemon.collect.time",
                            SimpleNamespace(time=lambda: self.now, monotonic=time.monotonic))


def ctx(log: Log) -> Context:
    c: Any = Context(log=log, guard=None, notify=lambda _: None)  # type: ignore[arg-type]
    return c


def test_reports_read_late_by_a_second_still_give_the_need(monkeypatch: Any) -> None:
    """An idle guest on a loaded TCG host reports every 2.6 s, read at 1 s ticks, and
    QEMU stamps each report in whole seconds: the third reading of every report looks
    more than 3 s old.  The need must still settle (CI: with a 3 s limit each such
    reading restarted the trend, and no balloon moved in 40 s of hard pressure)."""
    m, log, clock = managed(), Log(), WallClock(monkeypatch)
    start = clock.now
    needs = []
    for tick in range(20):
        t = start + tick + 0.5
        report = start + 0.9 + ((t - start - 0.9) // 2.6) * 2.6  # the last report sent
        _absorb(ctx(log), m, reading(clock, float(int(report)), t))
        needs.append(m.need_bytes)
    assert any(m.guest.age_s > 3 for m in [reading(clock, float(int(start + 2.6)), start + 5.5)])
    assert all(n is not None for n in needs[-6:]), needs
    assert needs[-1] == TOTAL - (TOTAL - USED) + (RAM - TOTAL) + HEADROOM_BYTES


def test_a_late_report_goes_unused_but_keeps_the_trend(monkeypatch: Any) -> None:
    m, log, clock = managed(), Log(), WallClock(monkeypatch)
    now = clock.now
    for i in range(5):  # fresh, distinct reports: hidden reserve known (3), trend settled (2)
        _absorb(ctx(log), m, reading(clock, now + 2 * i - 0.5, now + 2 * i))
    assert m.need_bytes is not None
    late = now + 10 + REPORT_MAX_AGE_S + 1
    _absorb(ctx(log), m, reading(clock, now + 8 - 0.5, late))
    assert m.need_bytes is None  # a stale report decides nothing
    assert any(e == "guest_report_rejected" for e, _ in log.events)
    # The next fresh report goes on from the trend: no two new reports needed.
    _absorb(ctx(log), m, reading(clock, late - 0.5, late))
    assert m.need_bytes is not None


def test_a_wrong_report_restarts_the_trend(monkeypatch: Any) -> None:
    m, log, clock = managed(), Log(), WallClock(monkeypatch)
    now = clock.now
    for i in range(5):
        _absorb(ctx(log), m, reading(clock, now + 2 * i - 0.5, now + 2 * i))
    assert m.need_bytes is not None
    bad = reading(clock, now + 10 - 0.5, now + 10)
    bad.guest = GuestStats(**{**bad.guest.as_dict(), "total_bytes": RAM + 64 * MiB})
    _absorb(ctx(log), m, bad)
    assert m.need_bytes is None
    _absorb(ctx(log), m, reading(clock, now + 12 - 0.5, now + 12))
    assert m.need_bytes is None  # one report after a lie is not a trend
    _absorb(ctx(log), m, reading(clock, now + 14 - 0.5, now + 14))
    assert m.need_bytes is not None


def test_the_age_limit_allows_one_missed_report() -> None:
    assert REPORT_MAX_AGE_S > 2 * STATS_POLL_INTERVAL_S
