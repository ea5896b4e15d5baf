"""Reading /proc for a process: liveness, its command line, memory of a VMA range,
its vCPU threads' run-queue wait."""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hv.errors import HostError, VMGone
from hv.units import KiB


@dataclass(frozen=True)
class RangeUsage:
    """Memory of the mappings overlapping one address range, from ``smaps``."""

    rss_bytes: int
    swap_bytes: int
    anon_huge_bytes: int


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


PF_EXITING = 0x4  # include/linux/sched.h: the task has begun do_exit()


def gone_or_exiting(pid: int) -> bool:
    """True if ``pid`` has exited or has begun to (its memory may already be torn down)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    # fields[0] is the state (field 3 of stat), fields[6] the flags (field 9).
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` (empty list if it has gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def exe_name(pid: int) -> str:
    """Basename of the executable of ``pid`` ("" if unknown)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def not_qemu(pid: int) -> str | None:
    """None if ``pid`` runs QEMU (its executable, its ``comm``, or its argv[0] is
    ``qemu*``); else what it runs, for a message."""
    exe = exe_name(pid)
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = ""
    argv0 = os.path.basename((cmdline(pid) or [""])[0])
    if any(name.startswith("qemu") for name in (exe, comm, argv0)):
        return None
    return exe or comm or argv0 or "nothing known"


# A header line of ``smaps`` ("START-END PERMS OFFSET DEV INODE [PATH]") and the three
# figures hv reads from the record under it (the kernel's names, in kB).
_SMAPS_HEADER_RE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ", re.MULTILINE)
_SMAPS_FIELD_RE = re.compile(rb"^(Rss|Swap|AnonHugePages):\s+(\d+) kB", re.MULTILINE)

# How much of ``smaps`` one read() asks for: the kernel hands out at most its seq_file
# buffer (a page, a few VMA records) per call anyway; this only bounds the copy.
SMAPS_READ_BYTES = 64 * KiB


def _vma_flags(pid: int, vm_name: str = "") -> list[tuple[int, int, list[bytes]]]:
    """Every mapping of ``pid`` with its smaps VmFlags: (start, end, flags)."""
    out: list[tuple[int, int, list[bytes]]] = []
    span: tuple[int, int] | None = None
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            for line in f:
                head = _SMAPS_HEADER_RE.match(line)
                if head is not None:
                    span = (int(head.group(1), 16), int(head.group(2), 16))
                elif span is not None and line.startswith(b"VmFlags:"):
                    out.append((*span, line.split()[1:]))
                    span = None
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise VMGone(vm_name or str(pid), f"process {pid} has exited") from exc
    return out


def mergeable(pid: int, addr: int, vm_name: str = "") -> bool:
    """Whether the VMA holding ``addr`` is open to KSM (``mg`` in its smaps VmFlags).

    QEMU marks guest RAM MADV_MERGEABLE unless told not to (``mem-merge=off``, or
    libvirt's ``<nosharepages/>``): an unmarked VM has opted out of page sharing.
    """
    for start, end, flags in _vma_flags(pid, vm_name):
        if start <= addr < end:
            return b"mg" in flags
    raise HostError(f"{vm_name or pid}: no mapping at {addr:#x} in /proc/{pid}/smaps")


def mergeable_ranges(pid: int, vm_name: str = "") -> list[tuple[int, int]]:
    """Every mapping of ``pid`` open to KSM (``mg`` in its smaps VmFlags), as (start, length).

    For QEMU: guest RAM and its other RAM blocks (firmware and option ROMs, video
    memory), all of which it marks MADV_MERGEABLE.
    """
    return [(start, end - start) for start, end, flags in _vma_flags(pid, vm_name)
            if b"mg" in flags]


def range_usage(pid: int, start: int, length: int, vm_name: str = "") -> RangeUsage:
    """Sum ``Rss``, ``Swap`` and ``AnonHugePages`` of the VMAs overlapping [start, start+length).

    VMAs only partly inside the range are counted whole; QEMU maps guest RAM as one
    VMA (or a few, once split by madvise), so this is exact for guest RAM.

    ``smaps`` lists VMAs by address and the kernel builds it as it is read (walking
    each VMA's page tables), so the file is read only up to the first VMA past the
    range, and only the overlapping records are parsed: for a QEMU of ~300 VMAs that
    is about a tenth of the CPU of reading and parsing the whole file.
    """
    end = start + length
    totals = {b"Rss": 0, b"Swap": 0, b"AnonHugePages": 0}
    buf = b""
    try:
        with open(f"/proc/{pid}/smaps", "rb", buffering=0) as f:
            while True:
                chunk = f.read(SMAPS_READ_BYTES)
                buf += chunk
                heads = list(_SMAPS_HEADER_RE.finditer(buf))
                # The last record may be cut off by the read: keep it for the next one.
                complete = len(heads) if not chunk else len(heads) - 1
                past = False
                for i in range(complete):
                    lo, hi = int(heads[i].group(1), 16), int(heads[i].group(2), 16)
                    if lo >= end:
                        past = True
                        break
                    if hi > start:
                        stop = heads[i + 1].start() if i + 1 < len(heads) else len(buf)
                        for field in _SMAPS_FIELD_RE.finditer(buf, heads[i].end(), stop):
                            totals[field.group(1)] += int(field.group(2)) * KiB
                if past or not chunk:
                    break
                if complete > 0:
                    buf = buf[heads[complete].start():]
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise VMGone(vm_name or str(pid), f"process {pid} has exited") from exc
    return RangeUsage(totals[b"Rss"], totals[b"Swap"], totals[b"AnonHugePages"])


# QEMU names its vCPU threads "CPU N/KVM", "CPU N/TCG" (multi-threaded TCG) or
# "ALL CPUs/TCG" (round-robin TCG): QEMU's accel/kvm/kvm-accel-ops.c and
# accel/tcg/tcg-accel-ops-{mttcg,rr}.c.
VCPU_COMM_SUFFIXES = ("/KVM", "/TCG")


def vcpu_threads(pid: int, vm_name: str = "") -> list[int]:
    """Thread ids of QEMU's vCPU threads, found by name (empty if QEMU names none).

    QEMU names its threads only with ``-name ...,debug-threads=on`` (libvirt always
    passes it); otherwise every thread is called ``qemu-system-x86``.
    """
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise VMGone(vm_name or str(pid), f"process {pid} has exited") from exc
    vcpus = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
                comm = f.read().strip().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited meanwhile
        if comm.endswith(VCPU_COMM_SUFFIXES):
            vcpus.append(tid)
    return vcpus


def vcpu_runqueue_wait_s(pid: int, vm_name: str = "", tids: Sequence[int] | None = None) -> float:
    """Time QEMU's vCPU threads spent runnable but waiting for a CPU, per vCPU, in s.

    Field 2 of ``/proc/PID/task/TID/schedstat`` (``run_delay``, ns), cumulative since
    each thread started: the mean over the vCPU threads, given as ``tids`` (QMP's
    ``query-cpus-fast`` reports them as ``thread-id``) or found by name
    (:func:`vcpu_threads`).  When QEMU names no thread, the *sum* over all threads
    but the main one (QEMU never runs a vCPU there): the mean over every thread
    would dilute a starved vCPU's wait among idle helper threads (measured: a TCG
    vCPU waiting 3.1 s in 10 s read as 1.0 s over 4 threads), while the sum bounds
    any one vCPU's wait from above, so VM time errs short (a period stretches)
    rather than long (a starved VM read as idle).  A thread that exits meanwhile is
    left out; a process that has gone raises :class:`~hv.errors.VMGone`, one left
with none of the threads asked for, :class:`~hv.errors.HostError`.
    """
    named = list(tids) if tids is not None else vcpu_threads(pid, vm_name)
    if named:
        chosen, mean = named, True
    else:
        try:
            every = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise VMGone(vm_name or str(pid), f"process {pid} has exited") from exc
        chosen, mean = [t for t in every if t != pid] or every, False
    waits_ns = []
    for tid in chosen:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                waits_ns.append(int(f.read().split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    if not waits_ns:
        if not os.path.exists(f"/proc/{pid}/task"):
            raise VMGone(vm_name or str(pid), f"process {pid} has exited")
        raise HostError(f"process {pid}: none of its vCPU threads {chosen} is left")
    total_s = sum(waits_ns) / 1e9
    return total_s / len(waits_ns) if mean else total_s


def meminfo() -> dict[str, int]:
    """Host /proc/meminfo in bytes, keyed by the kernel's names (``MemAvailable``...)."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            parts = rest.split()
            value = int(parts[0])
            out[key] = value * KiB if len(parts) > 1 and parts[1] == "kB" else value
    return out


# glibc's mallopt parameters (malloc.h).
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3


def limit_malloc(arenas: int, mmap_threshold_bytes: int) -> bool:
    """Keep glibc's malloc from holding on to freed memory (call before starting threads).

    - **Arenas.** By default each thread that allocates may get an arena of its own
      (up to 8 per core), and memory freed there stays with the process: ``hv run``'s
      worker threads (scans, sampling, page-out) grew it by ~60 MiB in 30 minutes.
    - **A fixed mmap threshold.** Blocks at least this large are mapped on their own
      and unmapped when freed.  glibc's default threshold rises to the size of any
      mapped block freed (up to 32 MiB), after which a scan's arrays of a few MiB come
      from the heap and the gaps between them stay resident: RSS rose in steps of tens
      of MiB over a 30-minute soak.  Setting it turns the rise off.

    False where the C library has no ``mallopt`` (not glibc) or refuses a value.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas)) and bool(
            libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes))
    except (OSError, AttributeError):
        return False


PR_SET_THP_DISABLE = 41


def disable_thp() -> None:
    """No transparent huge pages for this process and what it starts
    (``prctl(PR_SET_THP_DISABLE)``: inherited across fork and kept across exec; it
    overrides the ``MADV_HUGEPAGE`` QEMU gives guest RAM).  Raises OSError if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
