"""Freeing the memory hypervisor swap wrote out: the swap cache, by per-node reclaim.

``process_madvise(MADV_PAGEOUT)`` writes a page to swap and unmaps it, but the page
stays in the swap cache.  Measured on these hosts (Linux 6.18, swap file on ext4):
1 GiB of a process paged out raised ``SwapCached`` by 1 GiB and ``MemAvailable`` by
nothing, and 12 s later nothing had changed.  Only reclaim frees such pages, and
kswapd wakes only near the kernel's watermarks (tens of MiB on a 24 GiB host), far
below hv's states, so without help hypervisor swap pays the disk writes and frees no
host memory.

The kernel's per-node proactive reclaim frees them (:func:`release`): once the
writeback has ended, ``"N swappiness=max"`` written to
``/sys/devices/system/node/nodeX/reclaim`` (Linux 6.17 and later; ``max`` scans the
anonymous LRU only) frees pages from the tail of the inactive anonymous LRU, where the
kernel put each page whose writeback ended.  Measured: 1 GiB paged out, then released
in one request: ``SwapCached`` 1024 -> 2 MiB and ``MemAvailable`` +1 GiB in 0.16 s,
with 3 MiB of other anonymous pages swapped along with them.

That interface reclaims only while the node's unmapped page cache is above
``vm.min_unmapped_ratio`` (1 % of the node by default), and a host under pressure
often has less: the write then fails at once with EAGAIN and frees nothing.  The
ratio serves zone reclaim (``vm.zone_reclaim_mode``, 0 by default) and this
interface, nothing else.  Where ``zone_reclaim_mode`` is 0, hv sets the ratio to 0
for the length of one release and then puts it back; the caller's ``remember`` records
the original value first (hv's guard file), so the guardian restores it if hv dies
in between.  Where zone reclaim is on, hv leaves the ratio alone.

The interface frees pages from the tail of the node's inactive list, not the pages hv
paged out: it frees those only while they are at the tail.  Measured
(``scripts/bench_release.py``: a 512 MiB process reading its pages at random, two idle
512 MiB neighbours, 20 rounds of 64 MiB paged out and released): the pages the reader
takes back are not at the tail, and one request for all that was paged out swapped
764 MiB of the idle neighbours' pages.  So :func:`release` asks in steps of 1 MiB and
watches each: the first step that writes pages to swap anew (pages no page-out chose;
reclaiming a swap-cached page writes nothing) or reclaims less than half of itself
ends the release.  Same run: 36 MiB of the neighbours, and as much freed.  The step
that crosses the end still costs up to about 1 MiB (the kernel scans in batches), at
every release: a guest that takes its pages back between every page-out pays it each
time (``hv bench balloon`` at 192 MiB: about 30 MiB over a 25 s window, as before).
What a release wrote anew is its :attr:`Release.collateral_bytes`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hv.errors import HostError
from hv.host import swap
from hv.host.sysfs import Sysfs
from hv.units import MiB, PAGE_SIZE

__all__ = ["Release", "nodes", "release", "request", "restore_sysctls"]

NODE_RECLAIM_GLOB = "/sys/devices/system/node/node*/reclaim"
MIN_UNMAPPED_RATIO = "/proc/sys/vm/min_unmapped_ratio"
ZONE_RECLAIM_MODE = "/proc/sys/vm/zone_reclaim_mode"

# Reclaim skips a page still being written: wait for the writeback of what was just
# paged out (measured: 69 MiB in flight right after 1 GiB, drained in 0.05 s), but
# not for a busy disk's other writes forever.
WRITEBACK_WAIT_S = 1.0
WRITEBACK_DONE_BYTES = 1 * MiB
WRITEBACK_POLL_S = 0.01

# A release asks in steps of STEP_BYTES (about the most a step that reaches past the
# swap cache costs the neighbours).  A step is clean when the kernel reclaimed at least
# half of it (``pgsteal_proactive``) and wrote at most an eighth of it to swap anew
# (pages no page-out chose; swap in use is exact); the first that is not, or that the
# kernel cannot meet, ends the release.
STEP_BYTES = 1 * MiB
CLEAN_TAKE_FRACTION = 2
DIRTY_WRITE_FRACTION = 8

# One release at a time: the ratio is saved, lowered and restored around each release.
_lock = threading.Lock()


@dataclass(frozen=True)
class Release:
    """What one :func:`release` asked and what left the swap cache."""

    asked_bytes: int
    freed_bytes: int          # the fall of the nodes' nr_swapcached during the writes
    problem: str | None = None  # why it could not be asked (all or in part)
    collateral_bytes: int = 0   # swap written anew during the writes: pages not paged out
    stopped: bool = False       # ended before asking all: past the swap cache, or no more


def nodes() -> list[str]:
    """The per-node reclaim files this kernel has (empty before Linux 6.17)."""
    return sorted(glob.glob(NODE_RECLAIM_GLOB))


def _vmstat_or_none(path: str, key: str) -> int | None:
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return None


def _vmstat(path: str, key: str) -> int:
    return _vmstat_or_none(path, key) or 0


def _swapcached_pages(reclaim_file: str) -> int:
    return _vmstat(os.path.join(os.path.dirname(reclaim_file), "vmstat"), "nr_swapcached")


def _swap_used() -> int:
    total, free = swap.totals()
    return total - free


def _stolen() -> int:
    """Pages proactive reclaim has freed, in bytes (``pgsteal_proactive``; on a kernel
    that does not count them, the fall of the swap cache, which lags by up to 1 MiB)."""
    pages = _vmstat_or_none("/proc/vmstat", "pgsteal_proactive")
    if pages is None:
        pages = -sum(_swapcached_pages(f) for f in nodes())
    return pages * PAGE_SIZE


def _wait_writeback() -> None:
    deadline = time.monotonic() + WRITEBACK_WAIT_S
    while (_vmstat("/proc/vmstat", "nr_writeback") * PAGE_SIZE > WRITEBACK_DONE_BYTES
           and time.monotonic() < deadline):
        time.sleep(WRITEBACK_POLL_S)


def request(path: str, nbytes: int) -> str | None:
    """One proactive reclaim request to a node's file; None once asked (EAGAIN: asked,
    freed less), else why not.  ``nbytes`` 0 parses the request and reclaims nothing."""
    return _request(path, nbytes)[0]


def _request(path: str, nbytes: int) -> tuple[str | None, bool]:
    """:func:`request`, and whether the kernel reclaimed less than asked (EAGAIN)."""
    for option in ("swappiness=max", "swappiness=200"):  # max: Linux 6.15+
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            return f"cannot open {path}: {exc.strerror}", True
        try:
            os.write(fd, f"{nbytes} {option}".encode())
            return None, False
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return None, True
            if exc.errno != errno.EINVAL:
                return f"cannot write to {path}: {exc.strerror}", True
        finally:
            os.close(fd)
    return f"{path} accepts no swappiness option", True


def restore_sysctls(saved: dict[str, str], sysfs: Sysfs | None = None) -> None:
    """Put back tunables :func:`release` lowered (the guardian calls this too).

    Only ``vm.min_unmapped_ratio``, and only a percentage: a guard file that names
    anything else is garbled, and hv writes nothing from it.
    """
    sysfs = sysfs or Sysfs()
    for path, value in saved.items():
        if path != MIN_UNMAPPED_RATIO or not value.isdigit() or int(value) > 100:
            raise HostError(f"will not write {value!r} to {path}: not a tunable hv lowers")
    for path, value in saved.items():
        sysfs.write(path, value)


def release(nbytes: int, remember: Callable[[dict[str, str]], None],
            sysfs: Sysfs | None = None, step_bytes: int = STEP_BYTES) -> Release:
    """Free up to ``nbytes`` of swap cache that a page-out just filled.

    ``remember(values)`` is called with the tunables (path -> original value) before
    they are changed, and with ``{}`` once they are back; a ``HostError`` from it
    leaves them unchanged and is raised, as is one reading or writing them.  A
    kernel without the interface, or a node that refuses the write, is a
    :attr:`Release.problem`.  With ``step_bytes`` at ``nbytes`` it asks all at once, as
    hv did before (the baseline of ``scripts/bench_release.py``).
    """
    files = nodes()
    if nbytes <= 0:
        return Release(0, 0)
    if not files:
        return Release(0, 0, "the kernel has no per-node proactive reclaim (Linux 6.17 and "
                             "later): paged-out pages stay in the swap cache until the kernel "
                             "reclaims, so host free memory rises late")
    sysfs = sysfs or Sysfs()
    with _lock:
        _wait_writeback()
        before = {f: _swapcached_pages(f) for f in files}
        total = sum(before.values())
        if total == 0:
            return Release(0, 0)
        saved: dict[str, str] = {}
        if sysfs.read_int(ZONE_RECLAIM_MODE) == 0:
            ratio = sysfs.read(MIN_UNMAPPED_RATIO)
            if ratio != "0":
                saved = {MIN_UNMAPPED_RATIO: ratio}
                remember(saved)
                sysfs.write(MIN_UNMAPPED_RATIO, 0)
        problem: str | None = None
        asked = collateral = 0
        stopped = False
        try:
            # What is cached, up to what was paged out.
            left = min(nbytes, total * PAGE_SIZE)
            while left >= PAGE_SIZE and not stopped:
                piece = min(step_bytes, left)
                stolen = _stolen()
                used = _swap_used()
                for f, pages in before.items():
                    # Each node gives its share of what was cached at the start.
                    share = piece * pages // total
                    if share >= PAGE_SIZE:
                        why, short = _request(f, share)
                        problem = why or problem
                        stopped = stopped or short  # the node has nothing more to give
                asked += piece
                left -= piece
                took = _stolen() - stolen
                wrote = max(0, _swap_used() - used)
                collateral += wrote
                stopped = (stopped or wrote * DIRTY_WRITE_FRACTION > piece
                           or took * CLEAN_TAKE_FRACTION < piece)
        finally:
            if saved:
                restore_sysctls(saved, sysfs)
                # Unrecorded, the record stays: the guardian then writes the same value.
                with contextlib.suppress(HostError):
                    remember({})
        after = sum(_swapcached_pages(f) for f in files)
        return Release(asked, max(0, total - after) * PAGE_SIZE, problem, collateral,
                       stopped and left >= PAGE_SIZE)
