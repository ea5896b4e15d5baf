"""Scan running VMs into their page-state files and build the sharing index.

    async with open_targets(["g1", "g2"]) as targets:   # or targets from VM handles
        scanner = Scanner(targets)
        index = scanner.scan_all()          # scans every VM, updates state, builds the table
        scanner.close()

A target is checked before anything is read: its pid must be a QEMU process (a
wrong pid is refused with the name of what it is), and a VM that exits during its
scan raises :class:`~hv.errors.VMGone` with its state file left as it was (the scan
fills scratch arrays; the file is only updated from a complete scan).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np

from hv import backends
from hv.errors import HvError, NativeError, StateFileError, VMError, VMGone
from hv.host import native, proc
from hv.host.native import PageFlags, U64Array
from hv.qemu import launch as launcher
from hv.qemu.vm import VM, RamRange, VMInfo
from hv.sharing import state as st
from hv.sharing.index import SharingIndex, VmPages, build_index, read_ksm_stat
from hv.units import PAGE_SIZE

__all__ = ["Target", "check_qemu", "open_targets", "outside_ksm", "Scanner"]


@dataclass(frozen=True)
class Target:
    """A VM to scan: its name, QMP socket, QEMU pid and where its RAM lives.

    ``merge`` False: guest RAM is not open to KSM (no ``mg`` flag on its mapping: QOM
    ``merge=off`` on its memory backend, ``mem-merge=off``, libvirt's ``<nosharepages/>``);
    such a VM is kept out of scans and sharing estimates.
    """

    name: str
    socket: str
    pid: int
    ram: tuple[RamRange, ...]
    merge: bool | None = None  # its RAM open to KSM; None: not known

    @classmethod
    def from_info(cls, info: VMInfo) -> "Target":
        merge: bool | None = None  # a QEMU that exited is reported by the scan itself
        with contextlib.suppress(HvError):
            merge = bool(info.ram) and proc.mergeable(info.pid, info.ram[0].hva, info.name)
        return cls(info.name, info.socket, info.pid, info.ram, merge)

    @property
    def pages(self) -> int:
        return sum(r.size for r in self.ram) // PAGE_SIZE

    def identity(self) -> st.Identity:
        return st.Identity(self.name, self.socket, ",".join(r.block for r in self.ram),
                           sum(r.size for r in self.ram), self.pages)


def _minus(start: int, end: int, holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) less the [a, b) holes, as (start, length) pieces."""
    pieces = [(start, end)]
    for a, b in holes:
        pieces = [p for s, e in pieces for p in ((s, min(e, a)), (max(s, b), e)) if p[0] < p[1]]
    return [(s, e - s) for s, e in pieces]


def check_qemu(name: str, pid: int) -> None:
    """Refuse a pid that is not a running QEMU process."""
    if proc.gone_or_exiting(pid):
        raise VMGone(name, f"process {pid} does not exist")
    other = proc.not_qemu(pid)
    if other is not None:
        if proc.gone_or_exiting(pid):  # it exited while we looked
            raise VMGone(name, f"process {pid} does not exist")
        raise VMError(name, f"process {pid} is not QEMU (it runs {other!r})")


@asynccontextmanager
async def open_targets(names: Sequence[str], connect: str | None = None
                       ) -> AsyncIterator[list[Target]]:
    """Targets for VM names, QMP sockets or ``libvirt:DOMAIN`` (all known VMs if none
    are named)."""
    vms = ([backends.open_vm(n, connect) for n in names] if names
           else [VM(n, s) for n, s in launcher.known_vms()])
    out = []
    for vm in vms:
        async with vm:
            out.append(Target.from_info(vm.info))
    yield out


def outside_ksm(t: Target) -> tuple[U64Array, int]:
    """What KSM holds of the VM's QEMU outside guest RAM, in its other mergeable RAM
    blocks (ROMs, video memory), read from pagemap and kpageflags only: the frames of
    its KSM pages, and how many pages there map the zero page (KSM's zero pages among
    them: a zero-filled video memory).  KSM merges them across VMs and the kernel
    counts them in its profits (:mod:`hv.sharing.index`).  A QEMU that exits meanwhile
    has none."""
    ram = [(r.hva, r.hva + r.size) for r in t.ram]
    outside = []
    try:
        for start, length in proc.mergeable_ranges(t.pid, t.name):
            outside += _minus(start, start + length, ram)
        if not outside:
            return np.zeros(0, dtype=np.uint64), 0
        res = native.scan(t.pid, outside, read_content=False)
    except (VMGone, NativeError):
        return np.zeros(0, dtype=np.uint64), 0
    present = res.has(PageFlags.PRESENT)
    pfns: U64Array = res.pfns[res.has(PageFlags.KSM) & present]
    return pfns, int(np.count_nonzero(res.has(PageFlags.ZERO_PAGE) & present))


@dataclass
class Scanner:
    """Owns the open state files of a set of targets; scans them and builds the index."""

    targets: list[Target]
    replace_foreign: bool = False  # replace a bad state file instead of raising
    replaced: Callable[[StateFileError], None] | None = None  # told why a file was replaced
    scan_cpu_s: float = 0.0  # CPU hv spent scanning (this process), summed over scans
    scan_wall_s: float = 0.0
    _states: dict[str, st.PageState] = field(default_factory=dict)
    # Per VM, from its last scan: frames of the KSM pages of its QEMU outside guest RAM.
    _outside: dict[str, tuple[U64Array, int]] = field(default_factory=dict)

    def state(self, t: Target) -> st.PageState:
        s = self._states.get(t.name)
        if s is not None and s.identity != t.identity():  # relaunched with other RAM
            s.close()
            s = None
        if s is None:
            s = st.open_or_create(t.identity(), replace_foreign=self.replace_foreign,
                                  replaced=self.replaced)
            self._states[t.name] = s
        return s

    def scan_one(self, t: Target) -> native.ScanResult:
        """Scan one VM and fold the result into its state file."""
        check_qemu(t.name, t.pid)
        s = self.state(t)
        c0, w0 = time.process_time(), time.monotonic()
        try:
            res = native.scan(t.pid, [(r.hva, r.size) for r in t.ram])
        except NativeError as exc:
            # A process that dies under the scan shows as ESRCH, or as EINVAL/EIO from its
            # half-torn-down /proc files: whatever the errno, a dead QEMU means VMGone.
            if isinstance(exc, native.ProcessGone) or not proc.alive(t.pid):
                raise VMGone(t.name, f"QEMU (pid {t.pid}) exited during the scan; "
                             f"its page state in {s.path} is unchanged") from exc
            raise
        finally:
            self.scan_cpu_s += time.process_time() - c0
            self.scan_wall_s += time.monotonic() - w0
        st.update(s, res, t.pid)
        self._outside[t.name] = outside_ksm(t)
        return res

    def index(self) -> SharingIndex:
        """The table from the current state files (no scan)."""
        none: tuple[U64Array, int] = (np.zeros(0, dtype=np.uint64), 0)
        return build_index([VmPages(t.name, self.state(t).snapshot(), read_ksm_stat(t.pid),
                                    *self._outside.get(t.name, none))
                            for t in self.targets])

    def scan_stable(self, interval_s: float) -> SharingIndex:
        """Scan; if a VM had no page state from its current QEMU yet, look again after
        ``interval_s`` (stability needs two looks at the same content)."""
        again = any(self.state(t).scans == 0 or self.state(t).pid != t.pid for t in self.targets)
        index = self.scan_all()
        if again:
            time.sleep(interval_s)
            index = self.scan_all()
        return index

    def scan_all(self) -> SharingIndex:
        names = {t.name for t in self.targets}
        for name in [n for n in self._states if n not in names]:  # VMs no longer scanned
            self._states.pop(name).close()
            self._outside.pop(name, None)
        for t in self.targets:
            self.scan_one(t)
        return self.index()

    def close(self) -> None:
        for s in self._states.values():
            s.close()
        self._states.clear()
