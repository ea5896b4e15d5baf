"""The KSM governor: steer ksmd's scan rate from what hv's scan says is left to merge.

ESX shares pages itself; Linux leaves the merge to ksmd, which walks mergeable
memory at ``pages_to_scan`` pages every ``sleep_millisecs``.  Too slow and sharing
takes minutes to appear; too fast and ksmd burns a core for good after everything is
merged.  hv knows from its own scan how many stable duplicates are still unmerged
(the index's backlog), so it can run ksmd fast exactly while there is work:

* **converge**: the backlog is large — walk all present guest pages every
  ``fast_pass_s`` (KSM merges a page on its second or third sighting, so that is
  2-3 passes to converge), slowing the pass as the backlog shrinks, and capped by a
  CPU budget once ksmd's cost per page has been measured;
* **idle**: the backlog is small — a trickle, so ksmd stays far below 1% of a core;
  hv's next scan raises the rate again if new duplicates appear.

:func:`decide` is the pure policy (no I/O; unit tested); :class:`Governor` applies
it through :class:`~hv.host.ksm.Ksm` (which saves KSM's settings first and puts them
back on :meth:`Governor.stop`) and records ksmd's CPU time.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from hv.host.ksm import Ksm, KsmStats
from hv.sharing.index import SharingIndex

__all__ = ["Mode", "Params", "Observation", "Setting", "Decision", "decide", "Governor", "Sample"]


class Mode(enum.Enum):
    CONVERGE = "converge"
    IDLE = "idle"


@dataclass(frozen=True)
class Params:
    """Policy constants, each with its reason."""

    fast_pass_s: float = 1.5  # measured: merging takes 4-7 passes (smart_scan, THP splits); ~10 s
    slow_pass_s: float = 60.0  # a small backlog is not worth more than a pass a minute
    fast_backlog_fraction: float = 0.10  # a backlog of 10% of present pages gets the full rate
    idle_backlog_fraction: float = 0.02  # below 2% of present pages is "merged" (hash noise, churn)
    idle_backlog_min_pages: int = 512  # 2 MiB: never worth ksmd's time
    exit_idle_factor: float = 2.0  # hysteresis: leave idle only at twice the entry threshold
    sleep_millisecs: int = 20  # KSM's default tick; finer ticks only add wake-ups
    min_pages_to_scan: int = 100  # KSM's default batch
    max_pages_to_scan: int = 50_000  # a bound on one batch (200 MiB) whatever the estimate
    cpu_budget_cores: float = 0.5  # while converging, at most half a core (2-core hosts)
    idle_pages_to_scan: int = 100  # 100 pages/s idle: ~0.05% of a core at ~5 us/page
    idle_sleep_millisecs: int = 1000
    # After a VM leaves sharing, KSM still counts its unmerged pages (rmap items, the
    # per-process ksm_merging_pages and profit) until ksmd walks past them: at the idle
    # rate that is half an hour, so one pass runs at a pass per 30 s instead.
    sweep_pass_s: float = 30.0


@dataclass(frozen=True)
class Observation:
    """What the governor decides from."""

    present_pages: int  # present pages of the governed VMs (what ksmd walks)
    backlog_pages: int  # stable duplicates (and zero pages) not merged yet
    mode: Mode = Mode.CONVERGE  # the mode of the previous decision (for hysteresis)
    ksmd_cpu_s_per_page: float | None = None  # measured: ksmd CPU / pages_scanned
    pressure: bool = False  # memory is short (hard state): share before swap, full rate
    sweep: bool = False  # KSM's records are stale (a VM opted out): one pass, not a trickle


@dataclass(frozen=True)
class Setting:
    pages_to_scan: int
    sleep_millisecs: int

    @property
    def pages_per_s(self) -> float:
        return self.pages_to_scan * 1000.0 / self.sleep_millisecs


@dataclass(frozen=True)
class Decision:
    mode: Mode
    setting: Setting
    reason: str
    sweep: bool = False  # the one pass after a VM left sharing


def decide(obs: Observation, p: Params = Params()) -> Decision:
    """The KSM scan rate for this observation (pure)."""
    present = max(obs.present_pages, 1)
    idle_at = max(p.idle_backlog_min_pages, p.idle_backlog_fraction * present)
    threshold = idle_at * (p.exit_idle_factor if obs.mode is Mode.IDLE else 1.0)
    if obs.backlog_pages <= threshold and obs.sweep:
        rate = present / p.sweep_pass_s
        batch = min(max(math.ceil(rate * p.sleep_millisecs / 1000.0), p.min_pages_to_scan),
                    p.max_pages_to_scan)
        return Decision(Mode.CONVERGE, Setting(batch, p.sleep_millisecs),
                        f"a VM left sharing: one pass in {p.sweep_pass_s:.0f} s clears KSM's "
                        "records of its pages", sweep=True)
    if obs.backlog_pages <= threshold:
        return Decision(Mode.IDLE, Setting(p.idle_pages_to_scan, p.idle_sleep_millisecs),
                        f"backlog {obs.backlog_pages} pages <= {threshold:.0f}: idle")
    fraction = obs.backlog_pages / present
    if obs.pressure:  # every unmerged duplicate saves a page that would be swapped
        pass_s = p.fast_pass_s
    else:
        pass_s = p.fast_pass_s * max(1.0, p.fast_backlog_fraction / fraction)
        pass_s = min(pass_s, p.slow_pass_s)
    rate = present / pass_s
    why = f"backlog {obs.backlog_pages} of {present} pages: a pass every {pass_s:.1f} s"
    if obs.pressure:
        why += " (memory pressure)"
    if obs.ksmd_cpu_s_per_page is not None and obs.ksmd_cpu_s_per_page > 0:
        cap = p.cpu_budget_cores / obs.ksmd_cpu_s_per_page
        if rate > cap:
            rate = cap
            why += f", capped at {cap:.0f} pages/s by the CPU budget"
    batch = math.ceil(rate * p.sleep_millisecs / 1000.0)
    batch = min(max(batch, p.min_pages_to_scan), p.max_pages_to_scan)
    return Decision(Mode.CONVERGE, Setting(batch, p.sleep_millisecs), why)


@dataclass(frozen=True)
class Sample:
    """One step of the governor, for the record."""

    t_s: float
    mode: Mode
    pages_to_scan: int
    sleep_millisecs: int
    potential_pages: int
    realized_pages: int
    backlog_pages: int
    pages_sharing: int
    ksmd_cpu_s: float


@dataclass
class Governor:
    """Applies :func:`decide` to KSM, one index at a time."""

    ksm: Ksm
    params: Params = field(default_factory=Params)
    samples: list[Sample] = field(default_factory=list)
    mode: Mode = Mode.CONVERGE
    applied: Setting | None = None
    _t0: float = field(default_factory=time.monotonic)
    _last: KsmStats | None = None
    _cost_s_per_page: float | None = None
    overridden: int = 0  # times another writer had changed KSM and the governor re-applied
    sweep_pending: bool = False  # a VM left sharing; its pass has not started yet
    sweep_until: int | None = None  # ksmd's full_scans count that ends a sweep

    def _drifted(self) -> bool:
        """Someone else changed KSM since the governor last wrote it."""
        if self.applied is None:
            return False
        return (self.ksm.get("run") != "1"
                or self.ksm.get("pages_to_scan") != str(self.applied.pages_to_scan)
                or self.ksm.get("sleep_millisecs") != str(self.applied.sleep_millisecs))

    def start(self) -> None:
        """Turn KSM on with zero-page merging and hv's rate (originals saved first)."""
        extra: dict[str, object] = {}
        if self.ksm.has("advisor_mode"):
            extra["advisor_mode"] = "none"  # hv sets the rate; the advisor would fight it
        first = decide(Observation(1, 1 << 30), self.params).setting
        self.ksm.set(use_zero_pages=1, pages_to_scan=first.pages_to_scan,
                     sleep_millisecs=first.sleep_millisecs, run=1, **extra)
        self.applied = first
        self._last = self.ksm.stats()

    def sweep(self) -> None:
        """A VM left sharing: have ksmd walk everything once soon (see Params.sweep_pass_s).

        The pass starts at the first step whose backlog allows it (before that, ksmd
        converges at least as fast), and lasts two more full scans: the one under way
        then, and a whole one.
        """
        self.sweep_pending, self.sweep_until = True, None

    def _measure_cost(self, now: KsmStats) -> None:
        last, self._last = self._last, now
        if last is None:
            return
        scanned = now["pages_scanned"] - last["pages_scanned"]
        cpu = now.ksmd_cpu_s - last.ksmd_cpu_s
        if scanned >= 10_000 and cpu > 0.05:  # enough to be a measurement, not clock noise
            self._cost_s_per_page = cpu / scanned

    def step(self, index: SharingIndex, pressure: bool = False) -> Decision:
        """Decide from an index and write KSM's tunables if they change.

        ``pressure``: memory is short; run ksmd at the full rate while duplicates
        remain (no rescan is needed for that: the last index's backlog says so).
        """
        stats = self.ksm.stats()
        self._measure_cost(stats)
        if self.sweep_until is not None and stats["full_scans"] >= self.sweep_until:
            self.sweep_until = None
        d = decide(Observation(index.present, index.backlog_pages, self.mode,
                               self._cost_s_per_page, pressure,
                               self.sweep_pending or self.sweep_until is not None),
                   self.params)
        if self.sweep_pending and d.sweep:
            self.sweep_pending, self.sweep_until = False, int(stats["full_scans"]) + 2
        drifted = self._drifted()
        if d.setting != self.applied or drifted:
            self.overridden += drifted
            self.ksm.set(pages_to_scan=d.setting.pages_to_scan,
                         sleep_millisecs=d.setting.sleep_millisecs, run=1)
            self.applied = d.setting
        self.mode = d.mode
        self.samples.append(Sample(time.monotonic() - self._t0, d.mode, d.setting.pages_to_scan,
                                   d.setting.sleep_millisecs, index.potential_savings_pages,
                                   index.realized_savings_pages, index.backlog_pages,
                                   stats["pages_sharing"], stats.ksmd_cpu_s))
        return d

    def stop(self) -> None:
        """Put KSM's settings back as they were before :meth:`start`."""
        self.ksm.restore()
