"""Free-memory states and what hv does in each (paper, section 6.3).

Four states, each with a threshold expressed as a percentage of the memory hv
manages (defaults 6 / 4 / 2 / 1 %):

    ============  ==================  ================================================
    state         entered when free   hv does
    ============  ==================  ================================================
    ``HIGH``      (start state)       nothing
    ``SOFT``      drops below soft    balloons VMs toward their targets
    ``HARD``      drops below hard    also swaps out pages of VMs above target
    ``LOW``       drops below low     also pauses VMs above target
    ============  ==================  ================================================

The paper's rule: "a transition to a lower reclamation state occurs when the amount
of free memory drops below the lower threshold; after reclaiming memory, the system
transitions back to the next higher state only after significantly exceeding the
higher threshold".  So a state is *entered* going down when free memory falls below
its own threshold, and *left* for a better state only when free memory exceeds that
better state's threshold plus the hysteresis.  Between 4 % and 6 % free, for
example, hv stays in whichever of HIGH and SOFT it was in: reclamation that started
goes on until free memory is back above the high threshold (the goal of every
reclaiming state), and does not start until free memory falls below the soft one.

Share before swap: while the sharing scan has found duplicate
pages that KSM has not merged yet, hv raises KSM's scan rate before it swaps, and
in the hard state may hold swapping back for a short while if sharing alone would
cover the shortfall.

Pure: free memory and elapsed time are passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DEFAULT_HYSTERESIS_PCT",
    "MIN_UNREALIZED_SHARING_PAGES",
    "MAX_SWAP_DEFER_S",
    "MemState",
    "Thresholds",
    "StateTracker",
    "Actions",
    "actions_for",
    "should_pause",
    "SharingAdvice",
    "share_before_swap",
]


class MemState(enum.IntEnum):
    """Free-memory state; a larger value is a worse state (``LOW > HARD``)."""

    HIGH = 0
    SOFT = 1
    HARD = 2
    LOW = 3

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Thresholds:
    """Free-memory thresholds, percent of managed memory, strictly decreasing."""

    high_pct: float = 6.0  # the paper's default high threshold
    soft_pct: float = 4.0  # the paper's default soft threshold
    hard_pct: float = 2.0  # the paper's default hard threshold
    low_pct: float = 1.0  # the paper's default low threshold

    def __post_init__(self) -> None:
        values = (self.high_pct, self.soft_pct, self.hard_pct, self.low_pct)
        if not 100.0 > self.high_pct > self.soft_pct > self.hard_pct > self.low_pct > 0.0:
            raise ValueError(
                f"thresholds must satisfy 100 > high > soft > hard > low > 0, got {values}"
            )

    def pct(self, state: MemState) -> float:
        """The threshold that belongs to ``state``."""
        return {
            MemState.HIGH: self.high_pct,
            MemState.SOFT: self.soft_pct,
            MemState.HARD: self.hard_pct,
            MemState.LOW: self.low_pct,
        }[state]


# The paper's thresholds: 6 / 4 / 2 / 1 % of memory.
DEFAULT_THRESHOLDS = Thresholds()

# "Significantly exceeding" the better threshold, made concrete: half a percent of
# managed memory (about 120 MiB of 24 GiB) is above the tens of MiB that free memory
# swings between two polls from guest page cache and KSM merges, and half the
# narrowest gap between two default thresholds, so a recovering host still passes
# through each state rather than skipping over it.
DEFAULT_HYSTERESIS_PCT = 0.5


class StateTracker:
    """Turns successive free-memory readings into a state, with hysteresis.

    ``update(free_bytes)`` moves down to the worst state whose threshold free memory
    is below, or up to the best state whose threshold plus hysteresis free memory
    exceeds; otherwise the state stays.  The first reading starts from ``initial``
    (``HIGH`` unless a reload carries the state over).
    """

    def __init__(
        self,
        managed_bytes: int,
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
        hysteresis_pct: float = DEFAULT_HYSTERESIS_PCT,
        initial: MemState = MemState.HIGH,
    ) -> None:
        if managed_bytes <= 0:
            raise ValueError(f"managed memory must be positive, not {managed_bytes}")
        if not 0.0 <= hysteresis_pct < 100.0 - thresholds.high_pct:
            raise ValueError(
                f"hysteresis {hysteresis_pct}% must be >= 0 and leave the high threshold "
                f"({thresholds.high_pct}%) plus hysteresis below 100%"
            )
        self.managed_bytes = managed_bytes
        self.thresholds = thresholds
        self.hysteresis_pct = hysteresis_pct
        self._state = initial  # a reloaded configuration keeps the state it was in

    @property
    def state(self) -> MemState:
        """The current state (``HIGH`` before the first reading)."""
        return self._state

    def threshold_bytes(self, state: MemState) -> float:
        """The threshold of ``state`` in bytes."""
        return self.managed_bytes * self.thresholds.pct(state) / 100.0

    def free_goal_bytes(self) -> float:
        """Free memory reclamation aims for: enough to return to ``HIGH``.

        The high threshold plus the hysteresis: aiming at the threshold itself would
        leave the host hovering just under it, in ``SOFT`` for good.
        """
        return self.threshold_bytes(MemState.HIGH) + self.managed_bytes * self.hysteresis_pct / 100.0

    def shortfall_bytes(self, free_bytes: int) -> int:
        """Bytes to reclaim to bring free memory back above the high threshold.

        Every reclaiming state aims there (paper: targets "drive the aggregate amount
        of free space above the high threshold").
        """
        return max(0, int(self.threshold_bytes(MemState.HIGH)) - free_bytes)

    def update(self, free_bytes: int) -> MemState:
        """Feed one reading of free memory; return the (possibly new) state."""
        worse = [s for s in MemState if s > self._state]
        down = [s for s in worse if free_bytes < self.threshold_bytes(s)]
        if down:
            self._state = max(down)
            return self._state
        margin = self.managed_bytes * self.hysteresis_pct / 100.0
        better = [s for s in MemState if s < self._state]
        up = [s for s in better if free_bytes > self.threshold_bytes(s) + margin]
        if up:
            # Above the best qualifying threshold means above every worse one too,
            # so no entry rule pulls the new state down again.
            self._state = min(up)
        return self._state


@dataclass(frozen=True)
class Actions:
    """What the controllers do in a state.

    ``pause_above_target`` False means: resume every VM hv paused.
    """

    balloon: bool
    swap: bool
    pause_above_target: bool


def actions_for(state: MemState, hypervisor_swap: bool = True) -> Actions:
    """The paper's ladder: each worse state adds a harsher mechanism.  Without
    ``hypervisor_swap`` (``reclaim = "balloon"``) no state pages VMs out."""
    return Actions(
        balloon=state >= MemState.SOFT,
        swap=hypervisor_swap and state >= MemState.HARD,
        pause_above_target=state >= MemState.LOW,
    )


def should_pause(state: MemState, allocated_bytes: int, target_bytes: int,
                 slack_bytes: int = 0) -> bool:
    """Whether a VM must be paused now: in ``LOW``, while it is above its target.

    A paused VM is resumed as soon as the state is ``HARD`` or better, or once
    swapping has brought it down to its target (the paper blocks only the VMs
    above target).  Within ``slack_bytes`` of target counts as at target: the same
    slack the caller's swapping stops at, so a VM is never left paused just above
    its target with nothing more to swap.
    """
    return (actions_for(state).pause_above_target
            and allocated_bytes > target_bytes + slack_bytes)


# Below 10 MiB of unrealized sharing, a faster KSM scan (measured here at ~17 % of a
# core at 5,000 pages per 10 ms) costs more than the memory it would win.
MIN_UNREALIZED_SHARING_PAGES = 2560

# How long hard-state swapping may wait for KSM: a fast KSM scan converged on 4
# Debian guests in under 10 s here, so 30 s is three times that before swap resumes.
MAX_SWAP_DEFER_S = 30.0


@dataclass(frozen=True)
class SharingAdvice:
    """Share-before-swap decision for one cycle."""

    raise_ksm_rate: bool
    defer_swap: bool


def share_before_swap(
    state: MemState,
    unrealized_sharing_pages: int,
    shortfall_pages: int,
    deferred_for_s: float = 0.0,
) -> SharingAdvice:
    """Decide whether to push KSM harder and whether swapping may wait for it.

    ``unrealized_sharing_pages``: duplicate pages the scan found that KSM has not
    merged yet.  ``shortfall_pages``: pages still to reclaim (see
    :meth:`StateTracker.shortfall_bytes`).  ``deferred_for_s``: how long swapping has
    already been held back for sharing in this episode.

    - ``HIGH``: nothing; the default KSM rate is enough when memory is not short.
    - ``SOFT`` or worse with enough unrealized sharing: raise KSM's rate, since
      merging is invisible to guests and cheaper than ballooning or swapping.
    - ``HARD``: also hold swapping back while sharing alone would cover the
      shortfall, for at most :data:`MAX_SWAP_DEFER_S`.
    - ``LOW``: never wait; memory is critically short and KSM takes seconds.
    """
    if unrealized_sharing_pages < 0 or shortfall_pages < 0 or deferred_for_s < 0:
        raise ValueError("page counts and time must not be negative")
    worth_it = unrealized_sharing_pages >= MIN_UNREALIZED_SHARING_PAGES
    raise_rate = state >= MemState.SOFT and worth_it
    defer = (
        state == MemState.HARD
        and worth_it
        and unrealized_sharing_pages >= shortfall_pages
        and deferred_for_s < MAX_SWAP_DEFER_S
    )
    return SharingAdvice(raise_ksm_rate=raise_rate, defer_swap=defer)
