"""The KSM service: hv's sharing scan and the KSM governor own KSM while hv runs.

Rounds: scan every VM (hashes of present, unmerged pages), rebuild the ESX sharing
table, let the governor set ksmd's rate from the backlog of unmerged duplicates.
hv's own scan has a CPU budget: the next round waits at least the round's CPU time
divided by :data:`SCAN_CPU_BUDGET_CORES`, whatever the interval.

Share before swap: under pressure (:meth:`SharingService.press`) the governor runs
ksmd at its full rate from the last table, with no rescan; swapping waits for it a
bounded while (:func:`~hv.policy.share_before_swap`).

KSM's tunables are saved before the first change and put back on :meth:`stop`; the
guard file records that they were raised, so the guardian puts them back if hv dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from typing import Any

from hv.daemon.managed import Context
from hv.errors import HostError, HvError
from hv.host.ksm import KSM_DIR, Ksm
from hv.policy import MemState, share_before_swap
from hv.sharing.governor import Governor, Mode
from hv.sharing.index import SharingIndex
from hv.sharing.scan import Scanner, Target
from hv.units import PAGE_SIZE

__all__ = ["SCAN_CPU_BUDGET_CORES", "SharingService"]

# hv's own scan may use 2 % of a core on average: a scan of four 512 MiB guests costs
# ~0.1 s of CPU, so the default 10 s interval stays inside it, and a host with many
# large guests scans less often rather than spending more.
SCAN_CPU_BUDGET_CORES = 0.02

# While nothing changes (ksmd idle, the sharing potential steady), the interval doubles
# up to 2 minutes: rescanning idle guests finds nothing new, and at 10 s it was most of
# hv's CPU on an idle host.  Any change, or memory pressure, brings it back at once.
MAX_QUIET_INTERVAL_S = 120.0

# The potential counts as steady within 1 % (or 64 pages): hash noise of idle guests.
STEADY_FRACTION = 0.01
STEADY_MIN_PAGES = 64


def claim_ksm(root: str = KSM_DIR) -> int:
    """Claim KSM for this hv: one hv governs it at a time, host-wide.

    A second daemon (on another state directory) would save the first one's raised
    rate as "the original" and put that back when it stops.  The claim is an exclusive
    flock on KSM's own sysfs directory, so it holds whatever directories each daemon
    uses, and is released when its holder exits, killed or not.  Returns the fd to
    keep open; HostError if another process holds it.
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot open {root}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HostError(f"another hv run governs KSM on this host (it holds {root} "
                        "locked)") from None
    return fd


class SharingService:
    """Scan rounds on a budget, the governor, and share before swap."""

    def __init__(self, ctx: Context, interval_s: Callable[[], float],
                 targets: Callable[[], list[Target]]) -> None:
        self.ctx = ctx
        self.interval_s = interval_s
        self.targets = targets
        self.ksm: Ksm | None = None
        self.governor: Governor | None = None
        self.scanner: Scanner | None = None
        self.index: SharingIndex | None = None
        self.pressure = False
        self.urgent = False  # memory is short (soft or worse): no quiet back-off
        self._wake = asyncio.Event()
        self.swap_deferred_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._scan: asyncio.Future[SharingIndex] | None = None
        self._claim: int | None = None  # the fd of claim_ksm(), while hv governs KSM
        self._ksmd_last: tuple[float, float] | None = None  # (monotonic s, ksmd CPU s)

    def observe(self) -> dict[str, Any] | None:
        """KSM and the service as the published status shows them (None: sharing off).

        ksmd's CPU share is measured between two calls (one per tick).
        """
        if self.ksm is None or self.governor is None:
            return None
        try:
            stats = self.ksm.stats()
        except HvError:
            return None
        now = time.monotonic()
        last, self._ksmd_last = self._ksmd_last, (now, stats.ksmd_cpu_s)
        share = None
        if last is not None and now > last[0]:
            share = max(0.0, stats.ksmd_cpu_s - last[1]) / (now - last[0])
        applied = self.governor.applied
        index = self.index
        return {
            "mode": self.governor.mode.value, "pressure": self.pressure,
            "pages_to_scan": applied.pages_to_scan if applied else None,
            "sleep_millisecs": applied.sleep_millisecs if applied else None,
            "counters": dict(stats.counters), "ksmd_cpu_seconds": stats.ksmd_cpu_s,
            "ksmd_cpu_fraction": share,
            "scan_cpu_seconds": self.scanner.scan_cpu_s if self.scanner else 0.0,
            "potential_pages": index.potential_savings_pages if index else None,
            "realized_pages": index.realized_savings_pages if index else None,
            "backlog_pages": index.backlog_pages if index else None,
            "vms": {v.vm: {"potential_pages": v.potential_savings_pages,
                           "realized_pages": v.realized_savings_pages,
                           "merging_pages": v.ksm_merging_pages if v.ksm_merging_pages
                           is not None else v.ksm_pages}
                    for v in (index.vms if index else ())}}

    async def start(self) -> None:
        """Turn KSM on under the governor (its settings saved first, undone on stop)."""
        try:
            self._claim = claim_ksm()
            self.ksm = Ksm()
            self.ctx.guard.ksm_raised = True
            self.ctx.guard.save()  # record before changing, so the guardian undoes it
            saved = await asyncio.to_thread(self.ksm.save)
            self.governor = Governor(self.ksm)
            await asyncio.to_thread(self.governor.start)
        except HvError as exc:
            self.ctx.log.write("ksm_unavailable", error=str(exc))
            self.ctx.notify(f"warning: page sharing off: {exc}")
            await self.stop()
            self.governor = None
            return
        self.ctx.log.write("ksm_raised", saved=saved,
                           now=await asyncio.to_thread(self.ksm.tunables))
        loop = asyncio.get_running_loop()

        def replaced(exc: HvError) -> None:  # called in the scan thread
            loop.call_soon_threadsafe(self._replaced, exc)

        self.scanner = Scanner([], replace_foreign=True, replaced=replaced)
        self._task = asyncio.create_task(self._loop())

    def _replaced(self, exc: HvError) -> None:
        """A page-state file that could not be used was started afresh."""
        self.ctx.log.write("page_state_replaced", error=str(exc))
        self.ctx.notify(f"warning: {exc}; started its page state afresh")

    def _next_interval(self, interval_s: float, quiet: bool) -> float:
        base = self.interval_s()
        if quiet and not self.urgent:
            return min(max(interval_s, base) * 2, max(base, MAX_QUIET_INTERVAL_S))
        return base

    async def _loop(self) -> None:
        assert self.scanner is not None and self.governor is not None
        failing: str | None = None
        interval_s = self.interval_s()
        last_potential: int | None = None
        while True:
            quiet = False
            cpu0 = self.scanner.scan_cpu_s
            try:
                self.scanner.targets = self.targets()
                # Shielded: a stop waits for the scan thread before closing its files.
                self._scan = asyncio.ensure_future(asyncio.to_thread(self.scanner.scan_all))
                self.index = await asyncio.shield(self._scan)
                decision = await asyncio.to_thread(self.governor.step, self.index, self.pressure)
                failing = None
                potential = self.index.potential_savings_pages
                quiet = (decision.mode is Mode.IDLE and last_potential is not None
                         and abs(potential - last_potential)
                         <= max(STEADY_MIN_PAGES, STEADY_FRACTION * last_potential))
                last_potential = potential
                self.ctx.log.write(
                    "share", mode=decision.mode.value, reason=decision.reason,
                    pages_to_scan=decision.setting.pages_to_scan,
                    sleep_millisecs=decision.setting.sleep_millisecs,
                    potential_pages=self.index.potential_savings_pages,
                    merged_pages=self.index.merged_savings_pages,
                    realized_pages=self.index.realized_savings_pages,
                    backlog_pages=self.index.backlog_pages,
                    scan_cpu_s=round(self.scanner.scan_cpu_s, 3))
            except Exception as exc:  # noqa: BLE001 - one bad round must not end sharing
                # Typically a VM that went away mid-scan (the tick drops it); anything
                # else is logged too, and the next round tries again.
                if failing != str(exc):
                    self.ctx.log.write("share_failed", error=str(exc) or repr(exc))
                failing = str(exc)
            spent = self.scanner.scan_cpu_s - cpu0
            interval_s = self._next_interval(interval_s, quiet)
            waited_from = time.monotonic()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval_s)  # woken by urgency
            # Woken or not, the CPU budget holds.
            budget_wait_s = spent / SCAN_CPU_BUDGET_CORES - (time.monotonic() - waited_from)
            await asyncio.sleep(max(0.0, budget_wait_s))

    def sweep(self) -> None:
        """A VM left sharing: the governor has ksmd walk everything once, from now."""
        if self.governor is not None:
            try:
                self.governor.sweep()
            except HvError as exc:
                self.ctx.log.write("share_failed", error=str(exc))
                return
            self._wake.set()

    async def press(self, on: bool) -> None:
        """Raise (or lower) ksmd's rate for memory pressure, from the last table."""
        if on == self.pressure:
            return
        self.pressure = on
        if self.governor is None or self.index is None:
            return
        try:
            d = await asyncio.to_thread(self.governor.step, self.index, on)
        except HvError as exc:
            self.ctx.log.write("share_failed", error=str(exc))
            return
        self.ctx.log.write("ksm_pressure", on=on, pages_to_scan=d.setting.pages_to_scan,
                           sleep_millisecs=d.setting.sleep_millisecs, reason=d.reason)

    async def advise(self, state: MemState, shortfall_bytes: int) -> bool:
        """Share before swap: push KSM now; True if swapping should wait for it."""
        urgent = state > MemState.HIGH
        if urgent and not self.urgent:
            self._wake.set()  # a quiet back-off ends now
        self.urgent = urgent
        if self.governor is None or self.index is None:
            return False
        now = time.monotonic()
        deferred_for = now - self.swap_deferred_since if self.swap_deferred_since else 0.0
        advice = share_before_swap(state, self.index.backlog_pages,
                                   shortfall_bytes // PAGE_SIZE, deferred_for)
        await self.press(advice.raise_ksm_rate)
        if advice.defer_swap:
            if self.swap_deferred_since is None:
                self.swap_deferred_since = now
                self.ctx.log.write("swap_deferred", backlog_pages=self.index.backlog_pages,
                                   state=str(state))
            return True
        if self.swap_deferred_since is not None and state < MemState.HARD:
            self.swap_deferred_since = None
        return False

    async def stop(self) -> None:
        """Stop scanning and put KSM's settings back."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._scan is not None:
            with contextlib.suppress(Exception):
                await self._scan
            self._scan = None
        if self.scanner is not None:
            self.scanner.close()
            self.scanner = None
        try:
            if not self.ctx.guard.ksm_raised:
                return
            try:
                ksm = self.ksm or Ksm()
                await asyncio.to_thread(ksm.restore)
                self.ctx.log.write("ksm_restored", now=await asyncio.to_thread(ksm.tunables))
            except HvError as exc:
                self.ctx.log.write("ksm_restore_failed", error=str(exc))
            self.ctx.guard.ksm_raised = False
            with contextlib.suppress(HostError):  # a full disk: the stop removes it anyway
                self.ctx.guard.save()
        finally:
            if self._claim is not None:
                os.close(self._claim)  # KSM is as hv found it: another hv may claim it
                self._claim = None
