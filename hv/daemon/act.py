"""Controllers: what the daemon changes, per VM — balloon, hypervisor swap, pause.

By state (:func:`~hv.policy.actions_for`):

- any state: a balloon below target grows back to it, and a balloon above ``max``
  shrinks to it (``max`` is a limit in every state);
- soft and worse: balloons shrink so each VM holds at most its target of host memory
  (:func:`~hv.policy.reclaim.balloon_goal`); a VM whose balloon cannot get there (the
  guest-need floor, no driver, no answer: :class:`~hv.policy.reclaim.BalloonProgress`)
  is paged out instead;
- hard and worse: every VM above target is also paged out (unless share before swap
  holds swapping back for a while);
- low: VMs above target are paused until they are at target or the state recovers.

What is paged out is then freed from the swap cache (:mod:`hv.host.reclaim`):
without that, the host would not get the memory back.

With ``[host] reclaim = "balloon"`` (``hypervisor_swap`` False) nothing is paged out,
neither in hard and low nor for a stuck balloon; ballooning and pausing are unchanged.

Only what hv paused is hv's to resume: a VM someone else paused keeps its state and
is left alone; one hv paused that someone else resumed is no longer hv's, and is not
paused again until the state has left low (it is still ballooned and swapped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from hv.daemon.managed import Context, ManagedVM
from hv.errors import HostError, HvError, VMGone
from hv.host import native, reclaim, swap
from hv.policy import MemState, actions_for, should_pause
from hv.policy.reclaim import (
    BALLOON_TOLERANCE_BYTES,
    SWAP_SLACK_BYTES,
    balloon_goal,
    swap_pages_for,
)
from hv.qemu.vm import balloon_floor
from hv.sampler import page_out_random
from hv.units import PAGE_SIZE, format_size

__all__ = ["act", "resume", "forget_pause", "page_out"]


def page_out(m: ManagedVM, n: int) -> tuple[int, int]:
    """Page out ``n`` random sampleable pages of the VM; (asked, invalidated)."""
    info = m.vm.info
    return page_out_random(info.pid, [(r.hva, r.size) for r in info.ram], n, m.rng)


def release(ctx: Context, pages: int) -> reclaim.Release:
    """Free the swap cache ``pages`` just paged out filled.  A problem (no kernel
    interface, a refused write) is told once, and page-out goes on."""
    try:
        r = reclaim.release(pages * PAGE_SIZE, ctx.guard.remember_sysctls)
    except HostError as exc:
        r = reclaim.Release(0, 0, str(exc))
    if r.problem is not None and r.problem != ctx.release_problem:
        ctx.log.write("release_failed", error=r.problem)
        ctx.notify(f"paged-out memory is not freed: {r.problem}")
    ctx.release_problem = r.problem
    return r


def _note_swap_effect(ctx: Context, m: ManagedVM, asked: int, invalidated: int) -> None:
    """Say once when page-out stops working (the host has no swap, or it is full)."""
    if asked and not invalidated and not m.swap_ineffective:
        total, free = swap.totals()
        why = "the host has no swap" if total == 0 else f"host swap has {format_size(free)} free"
        ctx.log.write("swap_ineffective", vm=m.name, reason=why)
        ctx.notify(f"{m.name}: hypervisor swap pages nothing out: {why}")
    m.swap_ineffective = bool(asked and not invalidated)


def forget_pause(ctx: Context, m: ManagedVM) -> None:
    """The VM is no longer hv's to resume: out of its state and of the guard file."""
    m.paused_by_hv = False
    ctx.guard.paused.pop(m.name, None)
    # A full disk keeps the old record: at worst the guardian resumes a VM no longer
    # paused by hv, which is better than stopping the daemon over it.
    with contextlib.suppress(HostError):
        ctx.guard.save()


async def resume(ctx: Context, m: ManagedVM, why: str) -> None:
    """Resume a VM hv paused, and forget that it did."""
    await m.vm.resume()
    forget_pause(ctx, m)
    ctx.log.write("resume", vm=m.name, why=why)


async def act(ctx: Context, m: ManagedVM, state: MemState, defer_swap: bool,
              hypervisor_swap: bool = True) -> None:
    """The VM's action job for this tick.  A QEMU that exits marks the VM gone."""
    try:
        await _act(ctx, m, state, defer_swap, hypervisor_swap)
    except (VMGone, native.ProcessGone) as exc:
        m.gone = str(exc)
    except HvError as exc:
        ctx.log.write("act_failed", vm=m.name, error=str(exc))
        if str(exc) != m.act_problem:  # a persistent failure is told once
            ctx.notify(f"{m.name}: action failed: {exc}")
        m.act_problem = str(exc)
    else:
        m.act_problem = None


async def _act(ctx: Context, m: ManagedVM, state: MemState, defer_swap: bool,
               hypervisor_swap: bool) -> None:
    assert m.reading is not None and m.target_bytes is not None
    r, target = m.reading, m.target_bytes
    running = r.run_state == "running"
    actions = actions_for(state, hypervisor_swap)
    if not actions.pause_above_target:
        m.pause_overridden = False  # a new low episode may pause it again
    if m.paused_by_hv and running:
        # Someone else resumed it: it is theirs now.
        forget_pause(ctx, m)
        m.pause_overridden = True
        ctx.log.write("resumed_by_other", vm=m.name)
    if not running and not m.paused_by_hv:
        return  # paused (or stopped) by someone else: keep its state, leave it alone
    now = time.monotonic()
    info = m.vm.info

    goal = balloon_goal(target, m.max_bytes, r.balloon_bytes, r.resident_bytes,
                        balloon_floor(info.ram_bytes), m.need_bytes)
    m.progress.update(now, goal, r.balloon_bytes)
    grow = goal > r.balloon_bytes + BALLOON_TOLERANCE_BYTES
    shrink = goal < r.balloon_bytes - BALLOON_TOLERANCE_BYTES and (
        actions.balloon or r.balloon_bytes > m.max_bytes)
    if (grow or shrink) and (m.balloon_asked is None
                             or abs(m.balloon_asked - goal) > BALLOON_TOLERANCE_BYTES):
        await m.vm.set_balloon(goal, force=True)
        m.balloon_asked = goal
        m.actions["balloon"] += 1
        ctx.log.write("balloon", vm=m.name, goal_bytes=goal, target_bytes=target,
                      actual_bytes=r.balloon_bytes, resident_bytes=r.resident_bytes,
                      need_bytes=m.need_bytes, state=str(state))

    stuck = (hypervisor_swap and actions.balloon
             and m.progress.cannot_reach(now, target, r.resident_bytes))
    if (actions.swap and not defer_swap) or stuck:
        n = swap_pages_for(r.resident_bytes, target)
        if n:
            asked, out = await asyncio.to_thread(page_out, m, n)
            rel = await asyncio.to_thread(release, ctx, out)
            m.actions["swap"] += 1
            m.paged_out_pages += asked
            ctx.log.write("swap", vm=m.name, pages=asked, invalidated=out,
                          freed_bytes=rel.freed_bytes, collateral_bytes=rel.collateral_bytes,
                          resident_bytes=r.resident_bytes, target_bytes=target,
                          why="balloon cannot reach target" if stuck and not actions.swap
                          else str(state))
            _note_swap_effect(ctx, m, asked, out)

    pause = (should_pause(state, r.resident_bytes, target, SWAP_SLACK_BYTES)
             and not m.pause_overridden)
    if pause and not m.paused_by_hv:
        ctx.guard.paused[m.name] = m.vm.socket_path
        try:
            ctx.guard.save()  # record before pausing, so the guardian resumes it
            await m.vm.pause()
        except BaseException:
            forget_pause(ctx, m)
            raise
        m.paused_by_hv = True
        m.actions["pause"] += 1
        ctx.log.write("pause", vm=m.name, resident_bytes=r.resident_bytes,
                      target_bytes=target, state=str(state))
    elif not pause and m.paused_by_hv:
        await resume(ctx, m, why=str(state))
