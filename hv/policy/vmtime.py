"""VM time: the part of wall time a VM actually ran (paper, section 5.3, on Linux).

The sampler measures how many of its sampled pages a VM touched in a period.  A VM
that did not run during the period touched nothing, whatever its working set: a
paused VM (QMP ``stop``, or hv's own pause in the low state) or one starved of host
CPU would read as idle and be taxed further.  So a sampling period counts *VM time*,
and :class:`VMClock` accumulates it from observations the caller makes now and then:

- ``wall_s``: a monotonic clock at the observation;
- ``running``: QEMU's run state was ``running`` at the observation;
- ``runqueue_wait_s``: the cumulative time the VM's vCPU threads spent runnable but
  waiting for a host CPU (field 2 of ``/proc/PID/task/TID/schedstat``, mean over the
  vCPU threads: :func:`hv.host.proc.vcpu_runqueue_wait_s`).

An interval between two observations counts only if the VM was running at both
ends; from it is taken the growth of run-queue wait over it, clamped to
``[0, interval]`` (a vCPU thread that went away, or a new set of threads, can make
the mean go down; waiting cannot exceed the interval).  An idle guest still counts:
its vCPUs sleep (HLT), which is not waiting for a CPU, so an idle VM that *could*
have run accrues VM time and is rightly measured idle.

What it cannot see: a pause and resume both inside one interval (the VM reads as
running throughout), so observe at least every few seconds; and an interval longer
than :data:`MAX_INTERVAL_S` is not counted at all, since running at both ends says
nothing about what happened over so long a gap (the observer itself stalled).
Missing VM time only stretches a sampling period or discards it, the safe side:
a VM is never taxed on a period it did not run.
"""

from __future__ import annotations

__all__ = ["MAX_INTERVAL_S", "VMClock"]

# Longest interval between observations that still counts: hv observes every 1-5 s
# (sampler polls, daemon ticks); a gap 6x longer means the observer stalled and a
# whole pause could hide inside it.
MAX_INTERVAL_S = 30.0


class VMClock:
    """VM time accumulated from run-state and run-queue observations of one VM."""

    def __init__(self, max_interval_s: float = MAX_INTERVAL_S) -> None:
        if max_interval_s <= 0:
            raise ValueError(f"max_interval_s must be > 0, not {max_interval_s}")
        self.max_interval_s = max_interval_s
        self._seconds = 0.0
        self._last: tuple[float, bool, float] | None = None
        self._observations = 0

    def observe(self, wall_s: float, running: bool, runqueue_wait_s: float) -> None:
        """Add one observation; the interval since the previous one counts if it may."""
        if runqueue_wait_s < 0:
            raise ValueError(f"run-queue wait cannot be negative: {runqueue_wait_s}")
        if self._last is not None:
            last_wall_s, last_running, last_wait_s = self._last
            interval_s = wall_s - last_wall_s
            if interval_s < 0:
                raise ValueError(
                    f"observations must come in wall-time order: {wall_s} after {last_wall_s}")
            if last_running and running and interval_s <= self.max_interval_s:
                waited_s = min(max(runqueue_wait_s - last_wait_s, 0.0), interval_s)
                self._seconds += interval_s - waited_s
        self._last = (wall_s, running, runqueue_wait_s)
        self._observations += 1

    @property
    def seconds(self) -> float:
        """VM time accumulated so far (0 before two observations)."""
        return self._seconds

    @property
    def observations(self) -> int:
        """How many observations were fed."""
        return self._observations

    @property
    def running(self) -> bool | None:
        """The run state at the last observation (``None`` before any)."""
        return None if self._last is None else self._last[1]

    def __repr__(self) -> str:
        return f"VMClock(seconds={self._seconds:.3f}, observations={self._observations})"
