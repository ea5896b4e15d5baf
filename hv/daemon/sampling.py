"""The working-set sampler of each VM, as a task beside the ticks (paper, section 5.3).

A period counts VM time (:class:`~hv.policy.vmtime.VMClock`, fed by the collections):
while the VM is paused or starved of CPU the period stretches, and a period in which
the VM barely ran is discarded instead of reading as idle.  Within a period, the
pages touched so far feed the estimator's in-period estimate, so a growing working
set shows before the period ends.  The estimates are saved per VM, so a restarted
hv resumes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hv import paths
from hv.daemon.managed import Context, ManagedVM
from hv.errors import HostError
from hv.host import native
from hv.policy import HostConfig
from hv.sampler import SampleResult, Sampler, SamplerUnavailable, check_can_sample

__all__ = ["sample_loop", "save_estimator"]

# A suspended sampler looks for swap again this often (one read of /proc/meminfo).
SWAP_RECHECK_S = 5.0


def save_estimator(m: ManagedVM) -> None:
    paths.write_json_atomic(m.estimator_file, {"estimator": m.estimator.to_dict(),
                                               "pid": m.pid, "measured_pages": m.measured_pages})


async def sample_loop(ctx: Context, m: ManagedVM, config: Callable[[], HostConfig]) -> None:
    """Sample ``m`` period after period; ``config()`` is read every period (reloads).

    Without usable swap (removed, or full) sampling is suspended: said once
    (``sampling_suspended``), the estimators keep what they had, and it resumes
    (``sampling_resumed``) when swap is back.
    """
    info = m.vm.info
    sampler = Sampler(info.pid, [(r.hva, r.size) for r in info.ram], config().sample_pages, m.rng)
    failing: str | None = None
    suspended: str | None = None

    def partial(touched: int, sampled: int) -> None:
        m.estimator.observe_partial(touched, sampled)

    def suspend(why: str) -> None:
        nonlocal suspended
        m.estimator.clear_partial()
        if suspended is None:
            ctx.log.write("sampling_suspended", vm=m.name, reason=why)
            ctx.notify(f"{m.name}: working-set sampling suspended: {why}")
        suspended = why

    while True:
        host = config()
        sampler.sample_pages = host.sample_pages
        try:
            check_can_sample()
        except SamplerUnavailable as exc:
            suspend(str(exc))
            await asyncio.sleep(min(host.sample_period_s, SWAP_RECHECK_S))
            continue
        if suspended is not None:
            ctx.log.write("sampling_resumed", vm=m.name)
            ctx.notify(f"{m.name}: working-set sampling resumed")
            suspended = None
        try:
            res: SampleResult = await sampler.period(
                host.sample_period_s, vm_clock=lambda: m.clock.seconds,
                on_partial=partial)
        except native.ProcessGone:
            return  # the tick notices and drops the VM
        except HostError as exc:  # e.g. swap full: try again next period
            if failing is None:
                ctx.log.write("sample_failed", vm=m.name, error=str(exc))
            failing = str(exc)
            await asyncio.sleep(host.sample_period_s)
            continue
        except Exception as exc:  # a bug: stop sampling this VM, say so, keep managing
            ctx.log.write("sampler_stopped", vm=m.name, error=repr(exc))
            ctx.notify(f"{m.name}: working-set sampler stopped: {exc!r}")
            return
        failing = None
        if sampler.swap_lost() is not None:
            suspend(res.discarded or "swap removed")
            continue
        if res.discarded is not None:
            m.estimator.clear_partial()
            ctx.log.write("sample_discarded", vm=m.name, why=res.discarded,
                          vm_s=res.vm_s, wall_s=res.wall_s)
            continue
        m.estimator.update(res.touched, res.sampled)
        if res.sampled:
            m.measured_pages = res.sampleable
        save_estimator(m)
        ctx.log.write("sample", vm=m.name, touched=res.touched, sampled=res.sampled,
                      dropped=res.dropped, sampleable=res.sampleable, present=res.present,
                      fraction=res.fraction, vm_s=res.vm_s, wall_s=res.wall_s,
                      slow=m.estimator.slow, fast=m.estimator.fast,
                      active=m.estimator.active_fraction)
