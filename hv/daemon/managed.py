"""One VM under management, and what the daemon's parts share about it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hv.eventlog import EventLog
from hv.guardian import GuardFile
from hv.policy import VMConfig, WorkingSetEstimator
from hv.policy.guest import HiddenEstimate, NeedTrend
from hv.policy.reclaim import BalloonProgress
from hv.policy.vmtime import VMClock
from hv.qemu.vm import VM, GuestStats

__all__ = ["ACTIONS", "Context", "Reading", "ManagedVM"]

# The kinds of action hv takes on a VM, counted per VM.
ACTIONS = ("balloon", "swap", "pause")


@dataclass
class Context:
    """What every part of the daemon writes to: the event log, the guard file, the operator."""

    log: EventLog
    guard: GuardFile
    notify: Callable[[str], None]
    release_problem: str | None = None  # why paged-out pages are not freed (told once)


@dataclass
class Reading:
    """One collection for one VM."""

    balloon_bytes: int
    resident_bytes: int
    swap_bytes: int
    run_state: str
    guest: GuestStats
    at_s: float  # monotonic time the collection finished


@dataclass
class ManagedVM:
    """One VM under management and what hv knows about it."""

    cfg: VMConfig
    vm: VM
    max_bytes: int
    estimator: WorkingSetEstimator
    estimator_file: Path
    pid: int
    measured_pages: int = 0  # sampleable pages at the last valid sample
    hidden: HiddenEstimate = field(default_factory=HiddenEstimate)
    report_at: float | None = None  # wall time of the last guest report counted
    need: NeedTrend = field(default_factory=NeedTrend)
    need_bytes: int | None = None  # what the guest needs: trusted fresh reports, use settled
    report_problem: str | None = None  # why the last report was rejected (logged once)
    last_actual: int | None = None  # balloon actual at the previous collection
    reading: Reading | None = None
    decided_s: float = 0.0  # when the reading last used for a decision was taken
    next_collect_s: float = 0.0  # when the VM is due again if nothing needs doing
    failing: str | None = None  # why collection fails (logged once)
    gone: str | None = None  # set when the QEMU exited
    act_problem: str | None = None  # why the last action failed (told once)
    target_bytes: int | None = None
    balloon_asked: int | None = None
    progress: BalloonProgress = field(default_factory=BalloonProgress)
    swap_ineffective: bool = False  # page-out invalidated nothing (no or full swap; logged once)
    paused_by_hv: bool = False
    pause_overridden: bool = False  # someone resumed what hv paused: not paused again this low
    job: asyncio.Task[None] | None = None  # the one QMP job (collect or act) in flight
    sampler_task: asyncio.Task[None] | None = None
    clock: VMClock = field(default_factory=VMClock)
    merge: bool | None = None  # its RAM backend's merge (open to KSM); None: unknown
    merge_off_by_hv: bool = False  # hv took it out of sharing in this run
    merge_problem: str | None = None  # why setting merge fails (logged once)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    # What hv did to the VM since it was attached: actions by kind ("balloon", "swap",
    # "pause") and pages paged out; counters for the metrics.
    actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    paged_out_pages: int = 0
    policy_source: dict[str, str] = field(default_factory=dict)  # min/max/shares -> where from
    discovered: bool = False  # a libvirt domain managed by [libvirt] manage = "all"

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def busy(self) -> bool:
        """A QMP job of this VM is still running (a slow or hung QEMU)."""
        return self.job is not None and not self.job.done()
