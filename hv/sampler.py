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
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hv.errors import HostError
from hv.host import native, swap
from hv.host.native import PageFlags
from hv.units import PAGE_SIZE

__all__ = ["SamplerUnavailable", "SampleResult", "Sampler", "check_can_sample",
           "sampleable_addresses"]

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

    @property
    def fraction(self) -> float | None:
        """``touched / sampled``, or None when nothing could be sampled."""
        return self.touched / self.sampled if self.sampled else None


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

    @property
    def running(self) -> bool:
        """True between :meth:`begin` and :meth:`end`."""
        return self._sample is not None

    def begin(self) -> int:
        """Pick and invalidate this period's sample; returns the pages invalidated."""
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
        self._sampleable = len(addrs)
        self._present = present
        return len(self._sample)

    def end(self) -> SampleResult:
        """Count the sampled pages touched since :meth:`begin`."""
        if self._sample is None:
            raise RuntimeError("Sampler.end() without begin()")
        sample, self._sample = self._sample, None
        touched = 0
        if len(sample):
            state = native.present(self.pid, sample)
            touched = int(((state & np.uint8(int(PageFlags.PRESENT))) != 0).sum())
        return SampleResult(touched=touched, sampled=len(sample), dropped=self._dropped,
                            sampleable=self._sampleable, present=self._present)

    async def period(self, period_s: float) -> SampleResult:
        """One whole period: begin, wait ``period_s``, end (page work off the loop)."""
        await asyncio.to_thread(self.begin)
        await asyncio.sleep(period_s)
        return await asyncio.to_thread(self.end)
