"""The working-set sampler of one VM (paper, section 5.3), on Linux.

Each period:

1. :meth:`Sampler.begin` reads the flags of every guest page (pagemap and
   kpageflags, no content: :func:`hv.host.native.scan` with ``read_content=False``,
   a few ms for 256 MiB) and picks ``n`` random pages among the *sampleable* ones:
   present, not a zero-page mapping, not KSM-merged.  Those are the only pages
   ``MADV_PAGEOUT`` can invalidate: it splits QEMU's transparent huge pages, and a
   split 4 KiB piece that is all zeros becomes a zero-page mapping that stays
   present; KSM pages stay mapped too.  It pages the chosen ones out; those still
   present right afterwards are dropped from the sample (and counted).
2. :meth:`Sampler.end`, a period later, counts the sampled pages present again:
   the guest touched them (a fault brought them back from swap).

The paper invalidates the TLB entries of the pages (a "touch" is a minor fault);
here a touch costs a swap-in, which is why the sample stays small.  Needs host
swap: without it, ``MADV_PAGEOUT`` leaves anonymous pages where they are and
:func:`check_can_sample` says so.

The fraction measured is of the *sampleable* pages (``SampleResult.sampleable``):
a VM whose pages are all ballooned, zero or shared has none to measure.

**VM time.**  A VM that did not run touched nothing: paused or starved of host CPU,
it would read as idle.  Given a VM clock (seconds the VM really ran, e.g. a
:class:`hv.policy.vmtime.VMClock` fed by :func:`follow_vm_time`),
:meth:`Sampler.period` waits until the VM has run ``period_s`` (and at least
``period_s`` of wall time has passed), stretching the period up to
:data:`MAX_STRETCH` periods of wall time.  A period that reaches that cap with less
than :data:`MIN_VM_FRACTION` of a period of VM time is *discarded*
(``SampleResult.discarded`` says why, ``fraction`` is None): the caller must not
feed an estimator with it.

**Touched so far.**  While it waits, the period counts the sampled pages present
again (a few µs for 100 pages) and reports them through ``on_partial``, so the
estimator can show a growing working set before the period ends
(:meth:`hv.policy.estimator.WorkingSetEstimator.observe_partial`).  A page once
seen touched stays touched for the period, even if the host swaps it out again.

**Swap removed.**  ``swapoff`` of an area the sample went to brings every sampled page
back, so all would read as touched: the period ends at the next poll and comes back
``discarded``, and nothing it saw reaches ``on_partial``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from hv.errors import HostError
from hv.host import native, proc, swap
from hv.host.native import PageFlags
from hv.policy.vmtime import VMClock
from hv.units import PAGE_SIZE

__all__ = ["MAX_STRETCH", "MIN_VM_FRACTION", "POLL_MAX_S", "SamplerUnavailable",
           "SampleResult", "Sampler", "check_can_sample", "follow_vm_time",
           "page_out_random", "sampleable_addresses"]

# Longest a period may stretch, in periods of wall time: a VM getting a quarter of
# a CPU still completes its period; one that gets less is paused or starving, and
# hv should not wait on it (nor hold its sample out of swap) indefinitely.
MAX_STRETCH = 4.0

# Least VM time, in periods, a period capped by MAX_STRETCH must hold to count:
# with half a period run, touched/sampled still reflects the working set (a page
# used every few seconds is seen); with less, a slow-cycling working set would
# read as idle, which is the error this guards against.
MIN_VM_FRACTION = 0.5

# Poll interval while a period runs, at most: growth shows within 3 s of a 30 s period
# (the tenth below), and per VM a poll (a thread hop and a pagemap read of n pages)
# costs more than its answer is worth every second.
POLL_MAX_S = 5.0

# ... and at most this fraction of the period, so short (test) periods still see
# ten polls and overrun their VM time by no more than a tenth.
POLL_PERIOD_FRACTION = 0.1

U64Array = npt.NDArray[np.uint64]


class SamplerUnavailable(HostError):
    """The host cannot run the working-set sampler (no swap)."""


def check_can_sample() -> None:
    """Raise :class:`SamplerUnavailable` unless the host has free swap."""
    total, free = swap.totals()
    if total == 0:
        raise SamplerUnavailable(
            "the working-set sampler cannot run: the host has no swap, and "
            "MADV_PAGEOUT only invalidates a guest page it can write to swap "
            "(create some with `hv swap create 1G`)")
    if free < PAGE_SIZE * 1024:
        raise SamplerUnavailable(
            f"the working-set sampler cannot run: host swap is full ({free // 1024} KiB free)")


@dataclass(frozen=True)
class SampleResult:
    """One period of one VM."""

    touched: int     # sampled pages present again at the period's end
    sampled: int     # pages really invalidated at the start
    dropped: int     # chosen pages still present after page-out (not invalidated)
    sampleable: int  # present, non-zero-page, non-KSM pages at the start
    present: int     # present pages of guest RAM at the start
    vm_s: float | None = None    # VM time the period lasted (None: begin/end used alone)
    wall_s: float | None = None  # wall time the period lasted
    discarded: str | None = None  # why the period must not feed an estimator, or None

    @property
    def fraction(self) -> float | None:
        """``touched / sampled``, or None when nothing could be sampled or discarded."""
        if self.discarded is not None or not self.sampled:
            return None
        return self.touched / self.sampled


def sampleable_addresses(pid: int, ranges: Sequence[tuple[int, int]]) -> tuple[U64Array, int]:
    """Host addresses of the pages page-out can invalidate, and the present count."""
    res = native.scan(pid, ranges, read_content=False)
    flags = res.flags
    ok = ((flags & np.uint16(int(PageFlags.PRESENT))) != 0) & (
        (flags & np.uint16(int(PageFlags.ZERO_PAGE | PageFlags.KSM))) == 0)
    index = np.flatnonzero(ok).astype(np.uint64)
    # Page index -> address: the ranges are laid out one after another in the arrays.
    starts = np.array([s for s, _ in ranges], dtype=np.uint64)
    firsts = np.cumsum([0] + [n // PAGE_SIZE for _, n in ranges], dtype=np.uint64)
    which = np.searchsorted(firsts[1:], index, side="right")
    addrs: U64Array = starts[which] + (index - firsts[which]) * np.uint64(PAGE_SIZE)
    return addrs, res.present


def page_out_random(pid: int, ranges: Sequence[tuple[int, int]], n: int,
                    rng: np.random.Generator) -> tuple[int, int]:
    """Page out ``n`` sampleable pages chosen at random (hypervisor swap, which cannot know
    which pages the guest needs); returns (asked, invalidated)."""
    addrs, _ = sampleable_addresses(pid, ranges)
    n = min(n, len(addrs))
    if n == 0:
        return 0, 0
    chosen = np.sort(rng.choice(addrs, size=n, replace=False))
    return n, native.pageout(pid, chosen).invalidated


class Sampler:
    """Sampling periods of one VM: ``begin()`` then, a period later, ``end()``."""

    def __init__(self, pid: int, ranges: Sequence[tuple[int, int]], sample_pages: int,
                 rng: np.random.Generator | None = None) -> None:
        if sample_pages < 1:
            raise ValueError(f"sample_pages must be at least 1, not {sample_pages}")
        self.pid = pid
        self.ranges = tuple(ranges)
        self.sample_pages = sample_pages
        self.rng = rng or np.random.default_rng()
        self._sample: U64Array | None = None
        self._dropped = 0
        self._sampleable = 0
        self._present = 0
        self._seen: npt.NDArray[np.bool_] | None = None  # sampled pages seen touched so far
        self._swap: frozenset[str] = frozenset()  # the swap areas the sample went to

    @property
    def running(self) -> bool:
        """True between :meth:`begin` and :meth:`end`."""
        return self._sample is not None

    def begin(self) -> int:
        """Pick and invalidate this period's sample; returns the pages invalidated."""
        self._swap = swap.active_paths()
        addrs, present = sampleable_addresses(self.pid, self.ranges)
        n = min(self.sample_pages, len(addrs))
        chosen = np.sort(self.rng.choice(addrs, size=n, replace=False)) if n else addrs[:0]
        out = native.pageout(self.pid, chosen) if n else None
        if out is not None:
            self._sample = chosen[~out.still_present]
            self._dropped = int(out.still_present.sum())
        else:
            self._sample = chosen
            self._dropped = 0
        self._seen = np.zeros(len(self._sample), dtype=np.bool_)
        self._sampleable = len(addrs)
        self._present = present
        return len(self._sample)

    def swap_lost(self) -> str | None:
        """Why the sample no longer measures anything, if swap it went to was removed:
        ``swapoff`` brings every page back, so all would read as touched."""
        lost = self._swap - swap.active_paths()
        if not lost:
            return None
        return f"swap {', '.join(sorted(lost))} was removed during the period"

    def touched_so_far(self) -> int:
        """Sampled pages touched since :meth:`begin` (only grows within a period)."""
        if self._sample is None or self._seen is None:
            raise RuntimeError("Sampler.touched_so_far() without begin()")
        if len(self._sample):
            state = native.present(self.pid, self._sample)
            self._seen |= (state & np.uint8(int(PageFlags.PRESENT))) != 0
        return int(self._seen.sum())

    def end(self) -> SampleResult:
        """Count the sampled pages touched since :meth:`begin`."""
        if self._sample is None:
            raise RuntimeError("Sampler.end() without begin()")
        touched = self.touched_so_far()
        sampled = len(self._sample)
        self._sample = self._seen = None
        return SampleResult(touched=touched, sampled=sampled, dropped=self._dropped,
                            sampleable=self._sampleable, present=self._present)

    def abandon(self) -> None:
        """Forget the period in progress (its pages stay paged out; nothing to undo)."""
        self._sample = self._seen = None

    async def period(self, period_s: float, vm_clock: Callable[[], float] | None = None,
                     on_partial: Callable[[int, int], None] | None = None, *,
                     max_stretch: float = MAX_STRETCH,
                     wall_clock: Callable[[], float] = time.monotonic) -> SampleResult:
        """One whole period: begin, wait until the VM ran ``period_s``, end.

        ``vm_clock`` returns the VM time so far in seconds (any origin; only its
        growth counts); ``None`` counts wall time, as a VM that always runs.  The
        wait ends once both VM and wall time reached ``period_s``, or at
        ``max_stretch * period_s`` of wall time; a period cut there with less than
        ``MIN_VM_FRACTION * period_s`` of VM time comes back ``discarded``.
        ``on_partial(touched_so_far, sampled)`` is called at every poll (every
        ``min(POLL_MAX_S, period_s / 10)``).  Page work runs off the event loop.
        """
        if period_s <= 0 or max_stretch < 1:
            raise ValueError(f"need period_s > 0 and max_stretch >= 1, got {period_s}, {max_stretch}")
        await asyncio.to_thread(self.begin)
        try:
            start_wall_s = wall_clock()
            start_vm_s = vm_clock() if vm_clock is not None else start_wall_s
            cap_s = max_stretch * period_s
            poll_s = min(POLL_MAX_S, period_s * POLL_PERIOD_FRACTION)
            sampled = len(self._sample) if self._sample is not None else 0
            while True:
                now_s = wall_clock()
                wall_s = now_s - start_wall_s
                vm_s = (vm_clock() - start_vm_s) if vm_clock is not None else wall_s
                if (wall_s >= period_s and vm_s >= period_s) or wall_s >= cap_s:
                    break
                if vm_clock is None and on_partial is None:
                    nap_s = period_s - wall_s  # nothing to watch: sleep out the period
                else:
                    nap_s = min(poll_s, cap_s - wall_s)
                    if vm_clock is None:
                        nap_s = min(nap_s, period_s - wall_s)
                await asyncio.sleep(nap_s)
                if self.swap_lost() is not None:
                    break
                if on_partial is not None:
                    on_partial(await asyncio.to_thread(self.touched_so_far), sampled)
            res = await asyncio.to_thread(self.end)
            lost = self.swap_lost()
        except BaseException:
            self.abandon()
            raise
        discarded = None
        if lost is not None:
            discarded = lost
        elif vm_s < MIN_VM_FRACTION * period_s:
            discarded = (f"the VM ran {vm_s:.1f} s of a {period_s:g} s period in "
                         f"{wall_s:.1f} s (paused or starved of CPU)")
        return replace(res, vm_s=vm_s, wall_s=wall_s, discarded=discarded)


async def follow_vm_time(clock: VMClock, pid: int, running: Callable[[], Awaitable[bool]],
                         interval_s: float = POLL_MAX_S, vm_name: str = "",
                         vcpu_tids: Sequence[int] | None = None) -> None:
    """Feed ``clock`` forever, one observation per ``interval_s`` (run as a task).

    ``running`` tells whether QEMU's run state is ``running`` (QMP ``query-status``);
    the run-queue wait comes from ``/proc`` (:func:`hv.host.proc.vcpu_runqueue_wait_s`,
    over ``vcpu_tids`` if known, else the threads QEMU names as vCPUs).
    Raises :class:`~hv.errors.VMGone` once the process has gone.
    """
    while True:
        is_running = await running()
        wait_s = proc.vcpu_runqueue_wait_s(pid, vm_name, vcpu_tids)
        clock.observe(time.monotonic(), is_running, wait_s)
        await asyncio.sleep(interval_s)
