"""The controller of per-VM KSM opt-out: puts each VM's RAM in or out of page sharing.

What a VM's backend ``merge`` should be comes from :func:`hv.sharing.optout.wanted`
(its config's ``ksm``, the admin's ``hv share --opt-out/--opt-in``); this sets it over
QMP as the VM's own job, like a collection, so a hung QEMU stalls only itself.  A
failure is logged once and tried again next tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hv.daemon.managed import Context, ManagedVM
from hv.errors import HvError, VMGone

__all__ = ["MERGE_TIMEOUT_S", "read_merge", "set_merge"]

# QEMU unmerges the whole backend (MADV_UNMERGEABLE) before it answers: a page copy for
# every merged page, ~1 s per GiB merged on a slow host.
MERGE_TIMEOUT_S = 30.0


async def read_merge(ctx: Context, m: ManagedVM) -> None:
    """Learn whether the VM's RAM is open to KSM (left unknown if QEMU cannot say)."""
    try:
        m.merge = await asyncio.wait_for(m.vm.merge(), MERGE_TIMEOUT_S)
    except (HvError, asyncio.TimeoutError) as exc:
        ctx.log.write("merge_unknown", vm=m.name, error=str(exc) or "no answer")
        ctx.notify(f"{m.name}: cannot read its RAM backend's merge property ({exc}); "
                   "its KSM opt-out is not managed")


async def set_merge(ctx: Context, m: ManagedVM, on: bool,
                    left: Callable[[], None] | None = None) -> None:
    """Take the VM's RAM out of sharing (``on`` False) or put it back; ``left`` is
    called once the VM is out."""
    try:
        backend = await asyncio.wait_for(m.vm.set_merge(on), MERGE_TIMEOUT_S)
    except VMGone as exc:
        m.gone = str(exc)
        return
    except (HvError, asyncio.TimeoutError) as exc:
        problem = str(exc) or "no answer"
        if problem != m.merge_problem:
            m.merge_problem = problem
            ctx.log.write("merge_failed", vm=m.name, merge=on, error=problem)
        return
    m.merge, m.merge_problem = on, None
    m.merge_off_by_hv = not on
    if not on and left is not None:
        left()
    ctx.log.write("ksm_opt_in" if on else "ksm_opt_out", vm=m.name, backend=backend)
    ctx.notify(f"{m.name}: " + ("back in page sharing" if on else
                                "opted out of page sharing; KSM unmerges its pages")
               + f" (merge={'on' if on else 'off'} on {backend})")
