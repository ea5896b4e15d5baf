"""The sharing index: the paper's table of shared and hint pages, built from scans.

ESX hashes a page, looks the hash up in a global table, and either shares the page
with a frame already there (after a full compare) or records it as a *hint*: unique
so far, re-hashed before a later match counts.  hv keeps the same table as numpy
arrays over every scanned VM at once (concatenate, sort, unique — no per-page
Python) and leaves the copy-on-write merge to KSM.  The categories:

* **zero**: present pages whose content is all zeros and that hold (or held, before
  KSM took it) a frame of their own: read as zeros, merged by KSM from zero content
  into a KSM frame, or mapped by KSM to the kernel's zero page (``use_zero_pages``;
  their count per VM is ``ksm_zero_pages`` of ``/proc/PID/ksm_stat``).  Every one is
  reclaimable.
* **zero-mapped**: the other pages that map the kernel's zero page: guest pages read
  before they were ever written.  They cost nothing before or after merging, so they
  count neither as potential nor as realized savings.  A zero-page mapping looks the
  same in ``pagemap`` whether KSM made it or a read fault did; the kernel's per-VM
  ``ksm_zero_pages`` tells how many of them are KSM's.
* **candidates**: present, non-zero pages whose hash stayed the same since the last
  scan (``stable >= 1``; the volatility filter), and KSM-merged pages (write-protected,
  so stable by construction; grouped with their hash when hv read it before the merge,
  else by their frame number — known without reading).
* **duplicates**: candidates in a group of two or more equal keys; a group of ``k``
  can be kept in one frame and so saves ``k - 1``.  A group is *inter-VM* when its
  pages belong to more than one VM.
* **hints**: candidates alone in their group (unique so far).  Every scan re-hashes
  them, so a later match is against current content, as the paper requires.
* **volatile**: present, non-zero pages that changed since the last scan (or were seen
  for the first time): not candidates.

Savings are split fairly: each page of a group of ``k`` is credited ``(k - 1) / k``,
so the credits of a group add up to what it saves.  *Potential* savings come from the
hashes.  *Merged* savings are what KSM's merges save now: pages flagged KSM grouped by
frame (``k - 1`` per frame, as KSM's ``pages_sharing``) plus KSM's zero pages.
*Realized* savings are merged savings less KSM's own bookkeeping (an rmap item of
:data:`KSM_RMAP_ITEM_BYTES` per page ksmd tracks, ``ksm_rmap_items`` of ``ksm_stat``),
which is how the kernel counts its profit: the index's realized total is KSM's
``general_profit`` in pages, and each VM's ``ksm_profit_pages`` (every page of the VM
that maps a KSM frame, plus its KSM zero pages, less its rmap items) is that VM's
``ksm_process_profit``.  The merged part is hv's own count from ``kpageflags``; KSM's
zero pages and rmap items are the kernel's counts, which no page flag shows.  The
backlog compares like with like: potential less merged, both over guest RAM.

QEMU opens its other RAM blocks to KSM too (firmware and option ROMs, video memory),
and KSM merges them across VMs; the kernel counts those merges in both profits.  So
a VM's input may carry the frames of the KSM pages of its QEMU *outside* guest RAM
(``outside_ksm_pfns``, frames only: nothing there is hashed).  They join the KSM frame
groups, so a frame's ``k`` counts every mapping, and their fair part is the VM's
``outside_savings_pages``: in realized savings and ``ksm_profit_pages``, not in merged
savings, the backlog or any page count of guest RAM.  KSM's zero pages there (a
zero-filled video memory, with ``use_zero_pages``) carry no KSM flag either: the
zero-page mappings outside (``outside_zero_pages``) are taken as KSM's first, up to the
kernel's ``ksm_zero_pages``, and guest RAM's zero-page mappings hold the rest, since
only guest RAM also maps the zero page for reads of never-written pages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hv.host.native import PageFlags
from hv.sharing.state import ZERO_HASH, Snapshot
from hv.units import PAGE_SIZE

__all__ = ["KSM_RMAP_ITEM_BYTES", "VmPages", "VmSharing", "SharingIndex", "build_index",
           "read_ksm_stat"]

# sizeof(struct ksm_rmap_item) on 64-bit Linux (mm/ksm.c): what the kernel subtracts per
# tracked page in general_profit and ksm_process_profit.
KSM_RMAP_ITEM_BYTES = 64

# Keys for KSM frames whose content hash hv never saw: the frame number tagged in the
# top bits, so they group by frame and (barring a 2^-48 coincidence) with nothing else.
_PFN_KEY_TAG = np.uint64(0xA5A5 << 48)

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class VmPages:
    """One VM's input to the index: its page state and, if known, its ksm_stat."""

    name: str
    snapshot: Snapshot
    ksm_stat: Mapping[str, int] = field(default_factory=dict)
    outside_ksm_pfns: U64Array = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    outside_zero_pages: int = 0  # outside guest RAM, mapping the zero page (KSM's or not)


@dataclass(frozen=True)
class VmSharing:
    """One row of the table (pages, except the *_pages credits, which are fractional)."""

    vm: str
    scanned: int
    present: int
    zero: int               # zero content with (or, before KSM, with) a frame of its own
    zero_page: int          # mapping the kernel's zero page (KSM's and read faults')
    zero_mapped: int        # of those, not KSM's: read before written; free either way
    stable_dups: int        # candidates in a group of two or more
    inter_vm_dups: int      # of those, in a group spanning more than one VM
    hints: int              # candidates unique so far
    volatile: int           # changed since the last scan, or first seen
    ksm_pages: int          # flagged KSM (merged, mapped more than once)
    ksm_merging_pages: int | None  # from /proc/PID/ksm_stat
    ksm_zero_pages: int | None
    ksm_rmap_items: int | None
    potential_savings_pages: float  # fair part of what full sharing would save
    merged_savings_pages: float     # fair part of what KSM's merges save now
    realized_savings_pages: float   # merged + outside, less KSM's bookkeeping for this VM
    ksm_profit_pages: float | None  # the kernel's ksm_process_profit, from hv's count
    ksm_outside_pages: int = 0      # flagged KSM in its QEMU outside guest RAM (ROMs, video)
    outside_savings_pages: float = 0.0  # fair part of those merges, and KSM zero pages there

    @property
    def ksm_metadata_pages(self) -> float:
        """KSM's rmap items for this VM, in pages."""
        return (self.ksm_rmap_items or 0) * KSM_RMAP_ITEM_BYTES / PAGE_SIZE

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ksm_metadata_pages": round(self.ksm_metadata_pages, 1)}


@dataclass(frozen=True)
class SharingIndex:
    """The table over all scanned VMs."""

    vms: tuple[VmSharing, ...]
    groups: int                 # duplicate groups (two or more candidates)
    inter_vm_groups: int
    potential_savings_pages: int
    merged_savings_pages: int
    realized_savings_pages: int  # merged + outside, less KSM's bookkeeping: general_profit

    @property
    def backlog_pages(self) -> int:
        """Stable duplicates KSM has not merged yet (potential minus merged, at least 0)."""
        return max(0, self.potential_savings_pages - self.merged_savings_pages)

    @property
    def zero_mapped(self) -> int:
        return sum(v.zero_mapped for v in self.vms)

    @property
    def present(self) -> int:
        return sum(v.present for v in self.vms)

    def as_dict(self) -> dict[str, Any]:
        return {"vms": [v.as_dict() for v in self.vms], "groups": self.groups,
                "inter_vm_groups": self.inter_vm_groups,
                "potential_savings_pages": self.potential_savings_pages,
                "merged_savings_pages": self.merged_savings_pages,
                "realized_savings_pages": self.realized_savings_pages,
                "zero_mapped": self.zero_mapped,
                "backlog_pages": self.backlog_pages}


def read_ksm_stat(pid: int) -> dict[str, int]:
    """``/proc/PID/ksm_stat`` as numbers (empty if the kernel has none or the pid is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                key, _, value = line.strip().partition(" ")
                if value.lstrip("-").isdigit():
                    out[key] = int(value)
    except OSError:
        return {}
    return out


def _has(flags: npt.NDArray[np.uint16], flag: PageFlags) -> BoolArray:
    mask: BoolArray = (flags & np.uint16(int(flag))) != 0
    return mask


def _group_sizes(keys: U64Array) -> tuple[I64Array, I64Array]:
    """For each element: the size of its equal-key group, and the group's id."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inv = inverse.reshape(-1).astype(np.int64)
    return counts.astype(np.int64)[inv], inv


def _vms_per_group(group: I64Array, vm: I64Array, ngroups: int) -> I64Array:
    """Number of distinct VMs in each group."""
    if group.size == 0:
        return np.zeros(ngroups, dtype=np.int64)
    pairs = np.unique(group * np.int64(1 << 20) + vm)  # fewer than 2^20 VMs
    return np.bincount(pairs // np.int64(1 << 20), minlength=ngroups).astype(np.int64)


def _per_vm_sum(vm: I64Array, weights: npt.NDArray[Any] | None, nvms: int) -> npt.NDArray[np.float64]:
    return np.bincount(vm, weights=weights, minlength=nvms).astype(np.float64)


def build_index(vms: Sequence[VmPages]) -> SharingIndex:
    """Build the table from the VMs' page states (see the module docstring)."""
    nvms = len(vms)
    if nvms == 0:
        return SharingIndex((), 0, 0, 0, 0, 0)
    # Guest RAM pages, then every VM's KSM pages outside it (present, KSM, no hash).
    outside_kinds = int(PageFlags.PRESENT) | int(PageFlags.KSM)
    hashes = np.concatenate([v.snapshot.hashes for v in vms]
                            + [np.zeros(v.outside_ksm_pfns.size, np.uint64) for v in vms])
    pfns = np.concatenate([v.snapshot.pfns for v in vms]
                          + [v.outside_ksm_pfns.astype(np.uint64) for v in vms])
    flags = np.concatenate([v.snapshot.flags for v in vms]
                           + [np.full(v.outside_ksm_pfns.size, outside_kinds, np.uint16)
                              for v in vms])
    stable = np.concatenate([v.snapshot.stable for v in vms]
                            + [np.zeros(v.outside_ksm_pfns.size, v.snapshot.stable.dtype)
                               for v in vms])
    vm = np.concatenate([np.repeat(np.arange(nvms, dtype=np.int64),
                                   [v.snapshot.hashes.size for v in vms]),
                         np.repeat(np.arange(nvms, dtype=np.int64),
                                   [v.outside_ksm_pfns.size for v in vms])])
    ram = np.arange(hashes.size) < sum(v.snapshot.hashes.size for v in vms)

    present = _has(flags, PageFlags.PRESENT) & ram
    ksm = _has(flags, PageFlags.KSM) & _has(flags, PageFlags.PRESENT)  # outside RAM too
    zero_page = _has(flags, PageFlags.ZERO_PAGE) & present
    zero = present & (_has(flags, PageFlags.ZERO) | (hashes == np.uint64(ZERO_HASH)))

    # KSM frames: how many scanned pages map each, and one key per frame (the content
    # hash if hv read any of its pages before the merge, else the tagged frame number).
    ksm_idx = np.flatnonzero(ksm)
    ksm_share = np.zeros(hashes.size, dtype=np.float64)  # (k-1)/k per KSM page
    keys = hashes.copy()
    if ksm_idx.size:
        kp = pfns[ksm_idx]
        order = np.argsort(kp, kind="stable")
        sorted_idx = ksm_idx[order]
        sp = kp[order]
        starts = np.flatnonzero(np.concatenate(([True], sp[1:] != sp[:-1])))
        sizes = np.diff(np.append(starts, sp.size))
        rep = np.maximum.reduceat(hashes[sorted_idx], starts)
        rep = np.where(rep == 0, _PFN_KEY_TAG ^ sp[starts], rep)
        keys[sorted_idx] = np.repeat(rep, sizes)
        ksm_share[sorted_idx] = np.repeat((sizes - 1) / sizes, sizes)
        # KSM-merged zero content counts as zero (its carried hash is ZERO_HASH).
        zero[sorted_idx] |= np.repeat(rep == np.uint64(ZERO_HASH), sizes)
        zero &= ram
    realized_frames = int(round(ksm_share[~zero & ram].sum()))
    realized_zero_ksm = ksm_share[zero]
    outside_share = ksm_share * ~ram

    cand = present & ~zero & (keys != 0) & ((stable >= 1) | ksm)
    cidx = np.flatnonzero(cand)
    size_of, group_of = _group_sizes(keys[cidx])
    dup = size_of >= 2
    ngroups_all = int(group_of.max()) + 1 if group_of.size else 0
    vms_in_group = _vms_per_group(group_of, vm[cidx], ngroups_all)
    inter = dup & (vms_in_group[group_of] >= 2)
    dup_groups = np.unique(group_of[dup])
    share = np.where(dup, (size_of - 1) / np.maximum(size_of, 1), 0.0)

    cvm = vm[cidx]
    per_present = _per_vm_sum(vm[present], None, nvms)
    per_zero_page = _per_vm_sum(vm[zero_page], None, nvms)
    # Which zero-page mappings KSM made no page flag says; the kernel counts them per VM.
    # Outside guest RAM first: a zero page mapped in video memory is KSM's (the guest
    # wrote zeros there), where guest RAM also maps it for reads of never-written pages.
    kernel_zero = np.array([float(v.ksm_stat.get("ksm_zero_pages", 0)) for v in vms])
    per_outside_zero = np.minimum([float(v.outside_zero_pages) for v in vms], kernel_zero)
    per_ksm_zero = np.minimum(per_zero_page, kernel_zero - per_outside_zero)
    per_zero_mapped = per_zero_page - per_ksm_zero
    per_zero = _per_vm_sum(vm[zero], None, nvms) - per_zero_mapped
    per_ksm = _per_vm_sum(vm[ksm & ram], None, nvms)
    per_ksm_outside = _per_vm_sum(vm[ksm & ~ram], None, nvms)
    per_outside = _per_vm_sum(vm, outside_share, nvms) + per_outside_zero
    per_dup = _per_vm_sum(cvm[dup], None, nvms)
    per_inter = _per_vm_sum(cvm[inter], None, nvms)
    per_hint = _per_vm_sum(cvm[~dup], None, nvms)
    per_volatile = _per_vm_sum(vm[present & ~zero & ~cand], None, nvms)
    per_potential = per_zero + _per_vm_sum(cvm, share, nvms)
    per_merged = (per_ksm_zero + _per_vm_sum(vm[zero], realized_zero_ksm, nvms)
                  + _per_vm_sum(vm[~zero & ram], ksm_share[~zero & ram], nvms))

    rows = []
    for i, v in enumerate(vms):
        stat = v.ksm_stat
        rmap = stat.get("ksm_rmap_items")
        meta = (rmap or 0) * KSM_RMAP_ITEM_BYTES / PAGE_SIZE
        rows.append(VmSharing(
            vm=v.name, scanned=int(v.snapshot.hashes.size), present=int(per_present[i]),
            zero=int(per_zero[i]), zero_page=int(per_zero_page[i]),
            zero_mapped=int(per_zero_mapped[i]), stable_dups=int(per_dup[i]),
            inter_vm_dups=int(per_inter[i]), hints=int(per_hint[i]),
            volatile=int(per_volatile[i]), ksm_pages=int(per_ksm[i]),
            ksm_outside_pages=int(per_ksm_outside[i]),
            ksm_merging_pages=stat.get("ksm_merging_pages"),
            ksm_zero_pages=stat.get("ksm_zero_pages"), ksm_rmap_items=rmap,
            potential_savings_pages=round(float(per_potential[i]), 1),
            merged_savings_pages=round(float(per_merged[i]), 1),
            outside_savings_pages=round(float(per_outside[i]), 1),
            realized_savings_pages=round(float(per_merged[i] + per_outside[i]) - meta, 1),
            ksm_profit_pages=(round(float(per_ksm[i] + per_ksm_outside[i] + per_ksm_zero[i]
                                          + per_outside_zero[i]) - meta, 1)
                              if rmap is not None else None)))
    ksm_zero_total = int(per_ksm_zero.sum())
    potential = (int(zero.sum()) - int(per_zero_mapped.sum())
                 + int(size_of[dup].size - dup_groups.size))
    merged = ksm_zero_total + int(round(realized_zero_ksm.sum())) + realized_frames
    meta_total = sum(v.ksm_stat.get("ksm_rmap_items", 0) for v in vms) * KSM_RMAP_ITEM_BYTES
    return SharingIndex(
        vms=tuple(rows), groups=int(dup_groups.size),
        inter_vm_groups=int(np.count_nonzero(vms_in_group[dup_groups] >= 2)),
        potential_savings_pages=potential, merged_savings_pages=merged,
        realized_savings_pages=ksm_zero_total + int(per_outside_zero.sum())
        + int(round(ksm_share.sum())) - int(round(meta_total / PAGE_SIZE)))
