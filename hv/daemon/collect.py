"""Collectors: what the daemon reads each tick, per VM and for the host.

A collection reads the balloon's actual size, the guest's statistics and the run
state over QMP, and the host memory of guest RAM (resident, swapped: smaps) and the
vCPU threads' run-queue wait from ``/proc``.  It runs as the VM's own job, so a slow
or hung QEMU delays nobody else; a failure skips the VM for the tick (logged once,
and once more when it recovers); an exited QEMU marks the VM gone.

The guest's figures are untrusted (:mod:`hv.policy.guest`): a report that is stale or
impossible is rejected (logged once per reason) and leaves the VM without a
guest-need figure, so its balloon does not shrink on it.
"""

from __future__ import annotations

import asyncio
import time

from hv.daemon.managed import Context, ManagedVM, Reading
from hv.errors import HostError, HvError, VMGone
from hv.host import proc
from hv.policy.guest import GuestReport, check_report, report_is_late
from hv.qemu.vm import STATS_POLL_INTERVAL_S, guest_need_bytes

__all__ = ["COLLECT_TIMEOUT_S", "REPORT_MAX_AGE_S", "collect", "host_available_bytes"]

# One QMP round trip to a live QEMU takes milliseconds; a collection that takes 10 s
# is a VM in trouble.  It runs as the VM's own job, so it stalls only that VM.
COLLECT_TIMEOUT_S = 10.0

# A guest report older than this is not used to decide anything: one polling period
# missed, plus a second for QEMU's whole-second timestamp.  One period alone is not
# enough: a guest's reports come every 2.03-2.06 s under TCG, so with the timestamp's
# second a report read just before the next one is due was often 3.05 s old, and
# every other tick threw the guest's need away (measured in CI: no balloon at all
# for 40 s under hard host pressure).
REPORT_MAX_AGE_S = 2 * STATS_POLL_INTERVAL_S + 1.0


def host_available_bytes() -> int:
    """The host's ``MemAvailable``; failing to read it is fatal to the daemon."""
    try:
        return proc.meminfo()["MemAvailable"]
    except (OSError, KeyError, ValueError) as exc:
        raise HostError(f"cannot read host free memory from /proc/meminfo: {exc}") from exc


async def _read(m: ManagedVM) -> Reading:
    vm = m.vm
    actual = await vm.balloon_actual()
    stats = await vm.guest_stats(wait_s=0)
    run_state = await vm.status()
    usage = await asyncio.to_thread(vm.host_usage)
    return Reading(actual, usage.rss_bytes, usage.swap_bytes, run_state, stats, time.monotonic())


def _unanswered(m: ManagedVM) -> None:
    """A VM that did not answer is not known to have run: the VM clock gets a
    not-running observation, so the time around it (a SIGSTOPped QEMU, a hung one) is
    not counted as time the guest could have touched its pages."""
    try:
        wait_s = proc.vcpu_runqueue_wait_s(m.vm.info.pid)
    except (HvError, OSError):
        return
    m.clock.observe(time.monotonic(), False, wait_s)


def _absorb(ctx: Context, m: ManagedVM, r: Reading) -> None:
    """Fold one reading into what hv knows: the VM clock, the boot reserve, the need."""
    info = m.vm.info
    try:
        wait_s = proc.vcpu_runqueue_wait_s(info.pid)
    except (HvError, OSError):
        wait_s = None
    if wait_s is not None:
        m.clock.observe(r.at_s, r.run_state == "running", wait_s)
    g = r.guest
    report = GuestReport(g.total_bytes, g.free_bytes, g.available_bytes, g.age_s)
    problem = check_report(report, info.ram_bytes, r.balloon_bytes, info.deflate_on_oom,
                           REPORT_MAX_AGE_S)
    if problem != m.report_problem:
        if problem is not None and report.age_s is not None:  # no report at all is not news
            ctx.log.write("guest_report_rejected", vm=m.name, reason=problem)
        m.report_problem = problem
    still = m.last_actual == r.balloon_bytes
    m.last_actual = r.balloon_bytes
    if problem is not None or g.total_bytes is None or g.age_s is None:
        if not report_is_late(report, REPORT_MAX_AGE_S):
            m.need.reset()  # a late report only goes unused; a wrong one restarts the trend
        m.need_bytes = None
        return
    size = info.ram_bytes if info.deflate_on_oom else r.balloon_bytes
    reported_at = round(time.time() - g.age_s)
    if still and reported_at != m.report_at:  # a new report, taken with the balloon still
        m.hidden.add(size, g.total_bytes, info.ram_bytes)
        m.report_at = reported_at
    hidden = m.hidden.bytes
    if hidden is None:
        need = None
    elif info.deflate_on_oom:
        need = guest_need_bytes(g, hidden, info.ram_bytes - r.balloon_bytes)
    else:
        need = guest_need_bytes(g, hidden)
    m.need.add(reported_at, need)
    m.need_bytes = m.need.settled_bytes


async def collect(ctx: Context, m: ManagedVM) -> None:
    """The VM's collection job: fill ``m.reading``, or set ``m.failing`` / ``m.gone``."""
    try:
        reading = await asyncio.wait_for(_read(m), COLLECT_TIMEOUT_S)
    except VMGone as exc:
        m.gone = str(exc)
        return
    except (HvError, asyncio.TimeoutError) as exc:
        _unanswered(m)
        why = str(exc) or "timed out"
        if m.failing is None:  # a persistent failure is logged once
            ctx.log.write("collect_failed", vm=m.name, error=why)
            ctx.notify(f"{m.name}: cannot collect ({why}); skipping it until it answers")
        m.failing = why
        return
    _absorb(ctx, m, reading)
    m.reading = reading
    if m.failing is not None:
        ctx.log.write("collect_recovered", vm=m.name, error=m.failing)
        m.failing = None
