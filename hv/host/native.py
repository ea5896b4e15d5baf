"""Typed wrapper over the C extension ``hv._native`` (built from ``native/``).

The per-page loops live in C; this module only allocates (or accepts) numpy
arrays, passes them with ``ffi.from_buffer`` and turns a negative return value
into an exception at the call site:

* :class:`ProcessGone` (a :class:`~hv.errors.NativeError` with ``ESRCH``) when
  the process does not exist or exits during the call;
* :class:`~hv.errors.NativeError` for every other failure, carrying ``errno``.

Addresses are host-virtual addresses in the target process (for a VM: where
QEMU maps guest RAM).  Output arrays have one entry per 4 KiB page.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hv.errors import NativeError
from hv.host import proc
from hv.units import PAGE_SIZE

try:
    # A compiled cffi module: no stubs; ``ffi`` and ``lib`` are dynamic (Any).
    from hv._native import ffi as _ffi  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from hv._native import lib as _lib  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "hv._native is not built: run `pip install -e .` or "
        "`python native/build_scanner.py` in the source tree"
    ) from exc

__all__ = [
    "PageFlags",
    "ProcessGone",
    "ScanResult",
    "PageoutResult",
    "scan",
    "present",
    "pageout",
    "hash_pages",
    "memcpy_seconds",
]

U64Array = npt.NDArray[np.uint64]
U16Array = npt.NDArray[np.uint16]
U8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]


class PageFlags(enum.IntFlag):
    """Per-page flags of a scan; the values come from ``native/scanner.h``."""

    PRESENT = int(_lib.HV_PAGE_PRESENT)      # pagemap bit 63
    SWAPPED = int(_lib.HV_PAGE_SWAPPED)      # pagemap bit 62
    EXCLUSIVE = int(_lib.HV_PAGE_EXCLUSIVE)  # pagemap bit 56
    FILE = int(_lib.HV_PAGE_FILE)            # pagemap bit 61
    KSM = int(_lib.HV_PAGE_KSM)              # KPF_KSM and mapped more than once; not read
    ZERO_PAGE = int(_lib.HV_PAGE_ZERO_PAGE)  # KPF_ZERO_PAGE: maps the zero page
    ZERO = int(_lib.HV_PAGE_ZERO)            # all-zero content or the zero page
    THP = int(_lib.HV_PAGE_THP)              # KPF_THP (of pages whose frame flags were read)
    HUGE = int(_lib.HV_PAGE_HUGE)            # KPF_HUGE (hugetlbfs)
    READ = int(_lib.HV_PAGE_READ)            # read and hashed by this scan
    VANISHED = int(_lib.HV_PAGE_VANISHED)    # present, but unreadable when read
    NOFLAGS = int(_lib.HV_PAGE_NOFLAGS)      # frame flags unknown (no privilege)


class ProcessGone(NativeError):
    """The target process does not exist or exited during the call (ESRCH)."""

    def __init__(self, what: str, pid: int) -> None:
        self.pid = pid
        super().__init__(f"{what}: process {pid}", errno.ESRCH)


def _check(what: str, pid: int, rc: int) -> int:
    """Turn a ``-errno`` return into an exception; pass other values through."""
    if rc >= 0:
        return rc
    err = -rc
    if err in (errno.ESRCH, errno.ENOENT) or proc.gone_or_exiting(pid):
        # A process torn down under the call shows as ESRCH, or as EINVAL/EIO from
        # its half-gone /proc files: whatever the errno, a dead process is "gone".
        raise ProcessGone(what, pid)
    raise NativeError(f"{what}: process {pid}", err)


def _u64(values: Sequence[int] | npt.ArrayLike) -> U64Array:
    return np.ascontiguousarray(np.asarray(values, dtype=np.uint64))


def _out(arr: Any, dtype: type[np.generic], n: int, name: str) -> Any:
    """Check a caller-supplied output array (e.g. an mmap-backed state file)."""
    if arr is None:
        return np.zeros(n, dtype=dtype)
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != (n,):
        raise ValueError(f"{name} must be a numpy array of {np.dtype(dtype).name}[{n}]")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} must be C-contiguous and writeable")
    return arr


@dataclass(frozen=True)
class ScanResult:
    """One scan of a process's ranges: per-page arrays and counts."""

    hashes: U64Array  # XXH3-64 of the page's content; 0 unless READ
    flags: U16Array   # PageFlags per page
    pfns: U64Array    # host frame of present pages (KSM: the shared frame); else 0
    pages: int
    present: int
    swapped: int
    read: int
    bytes_read: int  # both ways: process_vm_readv and pread on /proc/PID/mem
    preads: int
    ksm: int
    zero: int        # all-zero content read, plus zero-page mappings
    zero_page: int   # mapping the zero page
    thp: int
    vanished: int
    noflags: int
    readvs: int          # process_vm_readv calls
    bytes_readv: int     # of bytes_read, read through process_vm_readv (one copy)
    readv_declined: int  # exclusive pages read by pread instead (remapped, shared, KSM, or readv failed)
    readv_huge: int = 0  # readv candidates PAGEMAP_SCAN found PMD-mapped (never KSM): no kpageflags

    def has(self, flag: PageFlags) -> BoolArray:
        """Boolean mask of the pages carrying ``flag``."""
        mask: BoolArray = (self.flags & np.uint16(int(flag))) != 0
        return mask


def _ranges(ranges: Sequence[tuple[int, int]]) -> tuple[U64Array, U64Array, int]:
    starts = _u64([start for start, _ in ranges])
    lengths = _u64([length for _, length in ranges])
    for start, length in ranges:
        if start % PAGE_SIZE or length % PAGE_SIZE or length < 0 or start < 0:
            raise ValueError(f"range {start:#x}+{length:#x} is not page aligned")
    npages = int(lengths.sum()) // PAGE_SIZE if len(ranges) else 0
    return starts, lengths, npages


def scan(
    pid: int,
    ranges: Sequence[tuple[int, int]],
    *,
    batch_bytes: int = 0,
    read_content: bool = True,
    all_frame_flags: bool = False,
    pread_only: bool = False,
    hashes: U64Array | None = None,
    flags: U16Array | None = None,
    pfns: U64Array | None = None,
) -> ScanResult:
    """Scan ``ranges`` ((host_virtual_start, length_bytes), page aligned) of ``pid``.

    Reads pagemap, then kpageflags, then the content of present pages that are
    neither KSM nor the zero page (never faulting a page in, never unmerging).
    Output arrays may be supplied (e.g. mmap-backed) and are filled in place.
    ``batch_bytes`` bounds one read (0: the C default).
    ``read_content=False`` stops after pagemap and kpageflags (no hashes, fast).

    Pages mapped only by this process and not KSM, as a fresh look at pagemap and
    kpageflags shows just before the read, are read with ``process_vm_readv`` (one
    copy in the kernel); all others with ``pread`` on /proc/PID/mem, which never pins
    a page and so never unmerges one (see ``read_window`` in native/scanner.c for
    the race this leaves and why it is small).  ``pread_only=True`` reads
    everything through /proc/PID/mem.

    /proc/kpageflags costs as much per frame as reading and hashing the page, so
    by default only pages pagemap does not mark exclusive (mapped once,
    anonymous) are reported with frame flags: shared pages, zero-page mappings and
    KSM pages mapped more than once.  A KSM page mapped once shares nothing; it is
    read (through /proc/PID/mem, which does not unmerge it) and not flagged KSM;
    exclusive pages carry no THP flag.  ``all_frame_flags=True`` reports frame
    flags for every present page.
    """
    starts, lengths, npages = _ranges(ranges)
    hashes_out: U64Array = _out(hashes, np.uint64, npages, "hashes")
    flags_out: U16Array = _out(flags, np.uint16, npages, "flags")
    pfns_out: U64Array = _out(pfns, np.uint64, npages, "pfns")
    counts = _ffi.new("struct hv_scan_counts *")
    rc = _lib.hv_scan(
        pid,
        _ffi.cast("const uint64_t *", _ffi.from_buffer(starts)),
        _ffi.cast("const uint64_t *", _ffi.from_buffer(lengths)),
        len(ranges),
        _ffi.cast("uint64_t *", _ffi.from_buffer(hashes_out, require_writable=True)),
        _ffi.cast("uint16_t *", _ffi.from_buffer(flags_out, require_writable=True)),
        _ffi.cast("uint64_t *", _ffi.from_buffer(pfns_out, require_writable=True)),
        npages,
        batch_bytes,
        (0 if read_content else int(_lib.HV_SCAN_NO_READ))
        | (int(_lib.HV_SCAN_ALL_FLAGS) if all_frame_flags else 0)
        | (int(_lib.HV_SCAN_PREAD_ONLY) if pread_only else 0),
        counts,
    )
    _check("scan", pid, int(rc))
    return ScanResult(
        hashes=hashes_out,
        flags=flags_out,
        pfns=pfns_out,
        pages=int(counts.pages),
        present=int(counts.present),
        swapped=int(counts.swapped),
        read=int(counts.read),
        bytes_read=int(counts.bytes_read),
        preads=int(counts.preads),
        ksm=int(counts.ksm),
        zero=int(counts.zero),
        zero_page=int(counts.zero_page),
        thp=int(counts.thp),
        vanished=int(counts.vanished),
        noflags=int(counts.noflags),
        readvs=int(counts.readvs),
        bytes_readv=int(counts.bytes_readv),
        readv_declined=int(counts.readv_declined),
        readv_huge=int(counts.readv_huge),
    )


def present(pid: int, addrs: Sequence[int] | npt.ArrayLike) -> U8Array:
    """Pagemap state of each page address: PRESENT / SWAPPED / EXCLUSIVE bits."""
    a = _u64(addrs)
    out = np.zeros(len(a), dtype=np.uint8)
    rc = _lib.hv_present(
        pid,
        _ffi.cast("const uint64_t *", _ffi.from_buffer(a)),
        len(a),
        _ffi.cast("uint8_t *", _ffi.from_buffer(out, require_writable=True)),
    )
    _check("present", pid, int(rc))
    return out


@dataclass(frozen=True)
class PageoutResult:
    """What MADV_PAGEOUT did to the requested pages."""

    advised_bytes: int   # as the kernel reported it (pages it was asked about)
    still_present: BoolArray  # per page: still mapped afterwards, not invalidated

    @property
    def invalidated(self) -> int:
        """Pages no longer present after the call."""
        return int((~self.still_present).sum())


def pageout(pid: int, addrs: Sequence[int] | npt.ArrayLike) -> PageoutResult:
    """Page out (``process_madvise(MADV_PAGEOUT)``) the pages at ``addrs`` of ``pid``.

    Anonymous pages go to swap only if the host has swap; KSM-shared, pinned and
    zero-page mappings stay present.  ``still_present`` is read back from pagemap
    right after the call, so it names the pages that could not be invalidated.
    """
    a = _u64(addrs)
    rc = _lib.hv_pageout(pid, _ffi.cast("const uint64_t *", _ffi.from_buffer(a)), len(a))
    advised = _check("pageout", pid, int(rc))
    after = present(pid, a)
    still = (after & np.uint8(int(PageFlags.PRESENT))) != 0
    return PageoutResult(advised_bytes=advised, still_present=still)


def hash_pages(buf: npt.NDArray[Any] | bytes | bytearray | memoryview) -> U64Array:
    """XXH3-64 of each whole 4 KiB page of ``buf`` (in memory; for checks and benchmarks)."""
    cbuf = _ffi.from_buffer(buf)
    n = len(cbuf) // PAGE_SIZE
    out = np.zeros(n, dtype=np.uint64)
    _lib.hv_hash_pages(cbuf, n, _ffi.cast("uint64_t *", _ffi.from_buffer(out, require_writable=True)))
    return out


def memcpy_seconds(nbytes: int, rounds: int) -> float:
    """Seconds for ``rounds`` memcpy calls of ``nbytes`` (a bandwidth baseline)."""
    secs = float(_lib.hv_memcpy_seconds(nbytes, rounds))
    if secs < 0:
        raise NativeError("memcpy_seconds", errno.ENOMEM)
    return secs
