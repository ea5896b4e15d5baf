"""How much memory the VMs share, and how each VM is brought to its target.

Pure rules of ``hv run`` (no I/O), in the order a tick uses them:

- :func:`pool_free_bytes` — free memory of the pool (the host's ``MemAvailable``,
  or less when ``host.managed`` bounds the pool);
- :func:`pool_bytes` — the memory the managed VMs share: what they hold now plus
  free memory above the high threshold (paper, section 6.3: targets are sized so
  that free memory returns above the high threshold; hv aims at the threshold plus
  the hysteresis, so reclamation ends back in the high state instead of hovering at
  its edge, squeezing the VMs every tick).  Memory used by other host processes is
  outside the pool, and the pool shrinks as soon as free memory falls;
- :func:`policy_active_fraction` — the sampler's fraction as a fraction of the
  allocation the policy charges;
- :func:`balloon_goal` — the balloon size that brings a VM's *host* memory to its
  target, never above ``max`` and never below what the guest needs;
- :func:`swap_pages_for` — how much hypervisor swap takes from a VM above target;
- :class:`BalloonProgress` — whether a VM's balloon can reach its target, or soft
  must fall back to hypervisor swap for it.

Targets are host memory (what a VM may hold: resident guest RAM), as in ESX where a
VM's allocation is the machine pages it holds.  A guest's balloon size is its own
view; the two differ by the guest memory the host never backed (untouched pages).
"""

from __future__ import annotations

from dataclasses import dataclass

from hv.units import MiB, PAGE_SIZE

__all__ = [
    "BALLOON_TOLERANCE_BYTES",
    "SWAP_SLACK_BYTES",
    "SWAP_MAX_PAGES_PER_TICK",
    "BALLOON_STUCK_S",
    "pool_free_bytes",
    "pool_bytes",
    "policy_active_fraction",
    "balloon_goal",
    "swap_pages_for",
    "BalloonProgress",
]

# A balloon target within 4 MiB of the actual size is reached: the guest driver works
# in 1 MiB steps and never lands exactly.
BALLOON_TOLERANCE_BYTES = 4 * MiB

# Resident memory within 4 MiB of target counts as "at target": guest RAM resident
# moves by a few hundred KiB between ticks from QEMU's own device accesses.
SWAP_SLACK_BYTES = 4 * MiB

# At most 64 MiB paged out per VM per tick: page-out writes to swap at disk speed
# (hundreds of MiB/s), so a 1 s tick stays a 1 s tick.
SWAP_MAX_PAGES_PER_TICK = 64 * MiB // PAGE_SIZE

# A balloon that has not moved toward its goal for 10 s is stuck (no driver, a guest
# that ignores it, a hung QEMU): a live driver moves hundreds of MiB per second.
BALLOON_STUCK_S = 10.0


def pool_free_bytes(mem_available_bytes: int, managed_bytes: int, vm_used_bytes: int) -> int:
    """Free memory of the pool: the host's, or the managed bound's if tighter.

    ``vm_used_bytes`` is what the managed VMs hold plus their overheads; with the
    default ``managed`` (the whole host) the host's ``MemAvailable`` rules.
    """
    return max(0, min(mem_available_bytes, managed_bytes - vm_used_bytes))


def pool_bytes(held_bytes: int, free_bytes: int, free_goal_bytes: float,
               bound_bytes: int) -> int:
    """Memory the VMs share: ``held + (free - goal)``, at most ``bound_bytes``.

    ``free_goal_bytes`` is the free memory reclamation aims for (the high threshold
    plus the hysteresis).  Below it the pool is smaller than what the VMs hold, by
    exactly the memory to reclaim; above it, the VMs may grow into the surplus.
    """
    pool = held_bytes + free_bytes - int(free_goal_bytes)
    return max(0, min(pool, bound_bytes))


def policy_active_fraction(estimate: float, measured_pages: int, allocated_bytes: int) -> float:
    """The active fraction of a VM's *allocation*, from the sampler's fraction.

    The sampler measures a fraction of the sampleable pages (present, not zero-page,
    not KSM); the policy charges the whole allocation, of which the rest is idle.
    An unmeasured VM (``measured_pages == 0``) keeps the estimate as is (1.0: all
    active).
    """
    if measured_pages <= 0 or allocated_bytes <= 0:
        return min(1.0, max(0.0, estimate))
    return min(1.0, max(0.0, estimate * measured_pages * PAGE_SIZE / allocated_bytes))


def balloon_goal(target_bytes: int, max_bytes: int, balloon_bytes: int, resident_bytes: int,
                 floor_bytes: int, need_bytes: int | None) -> int:
    """The balloon size hv asks for, so the VM holds at most ``target_bytes`` of host memory.

    - Above target by ``resident - target``: the balloon shrinks by that much (it is
      re-evaluated every tick, so guest pages the host never backed, given up first,
      are made up for on the next tick).
    - Below target with the balloon smaller than the target: it grows to the target
      (giving memory back is not reclamation).
    - Otherwise it stays.
    Never above ``max_bytes`` (a limit in every state), and never below the floor
    (``floor_bytes``) or what the guest needs (``need_bytes``; ``None`` when no
    trustworthy report exists: then the balloon does not shrink at all).
    """
    if resident_bytes > target_bytes + SWAP_SLACK_BYTES:
        goal = balloon_bytes - (resident_bytes - target_bytes)
    elif balloon_bytes < target_bytes:
        goal = target_bytes
    else:
        goal = balloon_bytes
    if goal < balloon_bytes:
        goal = balloon_bytes if need_bytes is None else max(goal, floor_bytes, need_bytes)
    return max(0, min(goal, max_bytes))


def swap_pages_for(resident_bytes: int, target_bytes: int) -> int:
    """Pages to page out this tick for a VM whose resident memory is above target."""
    over = resident_bytes - target_bytes
    if over <= SWAP_SLACK_BYTES:
        return 0
    return min(SWAP_MAX_PAGES_PER_TICK, over // PAGE_SIZE)


@dataclass
class BalloonProgress:
    """Whether a VM's balloon is getting it to its target.

    Fed once per tick with the goal hv wants and the balloon's actual size.  The
    balloon *cannot reach* the target when the VM has stayed above target for
    :data:`BALLOON_STUCK_S` with neither a new goal nor progress toward it: the goal
    stops at the guest-need floor, or the balloon does not move (no driver, a guest
    that ignores the request, no trustworthy report, no answer).  Soft then falls
    back to hypervisor swap for that VM.
    """

    goal_bytes: int | None = None
    gap_bytes: int | None = None
    since_s: float | None = None  # when the goal last changed or the gap last shrank

    def update(self, now_s: float, goal_bytes: int, actual_bytes: int) -> None:
        gap = abs(actual_bytes - goal_bytes)
        new_goal = (self.goal_bytes is None
                    or abs(goal_bytes - self.goal_bytes) > BALLOON_TOLERANCE_BYTES)
        progress = self.gap_bytes is not None and gap + BALLOON_TOLERANCE_BYTES < self.gap_bytes
        if new_goal or progress:
            self.since_s = now_s
        if new_goal or progress or self.gap_bytes is None or gap < self.gap_bytes:
            self.goal_bytes, self.gap_bytes = goal_bytes, gap

    def cannot_reach(self, now_s: float, target_bytes: int, resident_bytes: int) -> bool:
        """True if the VM is above target and its balloon has stopped bringing it there."""
        if resident_bytes <= target_bytes + SWAP_SLACK_BYTES or self.since_s is None:
            return False
        return now_s - self.since_s >= BALLOON_STUCK_S
