"""The VM handle: one QEMU, whether hv launched it or only knows its QMP socket.

    async with VM("g1", "/run/hv/g1/qmp.sock") as vm:
        print(vm.info.pid, vm.info.accel, vm.info.ram)
        await vm.set_balloon(128 * MiB)

Everything hv learns about a VM comes from QMP and ``/proc/PID``: the pid from the
socket's peer credentials, the accelerator from ``query-kvm``, the RAM size from
``query-memory-size-summary``, where guest RAM lives from HMP ``gpa2hva`` and
``info ramblock``, the balloon device by walking QOM.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from hv.errors import QMPError, UsageError, VMError, VMGone
from hv.host import proc
from hv.qemu import answers
from hv.qemu.qmp import QMPSession, Transcript
from hv.units import PAGE_SIZE, MiB, format_size

# The safe floor for a balloon target, documented in README.md ("Balloon floor").
FLOOR_MIN_BYTES = 96 * MiB  # Debian's cloud kernel hides ~40 MiB from MemTotal and uses ~25 MiB idle
FLOOR_FRACTION = 1 / 8  # struct pages, page tables and slab scale with the VM's size
HEADROOM_BYTES = 32 * MiB  # room above the guest's own use so inflation doesn't OOM it

STATS_POLL_INTERVAL_S = 2  # the guest refreshes its statistics this often once enabled
UINT64_MAX = 2**64 - 1  # QEMU's "no figure" for a guest statistic, as an unsigned field
ADDRESS_SPACE_END = 2**57  # user space ends below 2^56 even with 5-level paging: past it, no host address


class VMState(enum.Enum):
    """Lifecycle of a handle."""

    DETACHED = "detached"
    ATTACHED = "attached"
    GONE = "gone"


@dataclass(frozen=True)
class RamRange:
    """One contiguous piece of guest RAM in the QEMU process."""

    block: str
    hva: int
    size: int


@dataclass(frozen=True)
class VMInfo:
    """What attaching to a VM found out."""

    name: str
    socket: str
    pid: int
    accel: str
    ram_bytes: int
    ram: tuple[RamRange, ...]
    balloon_path: str | None
    deflate_on_oom: bool


@dataclass(frozen=True)
class GuestStats:
    """The guest's own view, from the virtio-balloon statistics queue (bytes, counts).

    ``None`` where the guest does not report a figure (the kernel sends -1).
    """

    total_bytes: int | None
    free_bytes: int | None
    available_bytes: int | None
    disk_caches_bytes: int | None
    swap_in_bytes: int | None
    swap_out_bytes: int | None
    major_faults: int | None
    minor_faults: int | None
    age_s: float | None  # seconds since the guest last updated the figures

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_STAT_KEYS = {
    "total_bytes": "stat-total-memory",
    "free_bytes": "stat-free-memory",
    "available_bytes": "stat-available-memory",
    "disk_caches_bytes": "stat-disk-caches",
    "swap_in_bytes": "stat-swap-in",
    "swap_out_bytes": "stat-swap-out",
    "major_faults": "stat-major-faults",
    "minor_faults": "stat-minor-faults",
}

_RAMBLOCK_RE = re.compile(
    r"^\s*(\S+)\s+\d+\s+\S+\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)", re.MULTILINE)
_GPA2HVA_RE = re.compile(r"Host virtual address for 0x0 \((\S+)\) is 0x([0-9a-f]+)")


def balloon_floor(ram_bytes: int) -> int:
    """The lowest balloon target hv accepts for a VM of ``ram_bytes`` (see README)."""
    return max(FLOOR_MIN_BYTES, int(ram_bytes * FLOOR_FRACTION))


def guest_need_bytes(stats: GuestStats, hidden_bytes: int, in_balloon_bytes: int = 0) -> int | None:
    """What a guest must keep: its own use + kernel-reserved memory + headroom.

    Own use is ``total - available`` from its statistics, less ``in_balloon_bytes``
    where deflate-on-oom leaves ballooned pages counted as used; ``hidden_bytes`` is
    what the guest kernel reserved at boot, outside MemTotal.  None without statistics.
    The one rule behind both ``hv balloon``'s check and ``hv run``'s balloon goals.
    """
    if stats.total_bytes is None or stats.available_bytes is None:
        return None
    own_use = stats.total_bytes - stats.available_bytes - in_balloon_bytes
    return max(0, hidden_bytes) + own_use + HEADROOM_BYTES


class VM:
    """A handle on one running QEMU, reached through its QMP socket."""

    def __init__(self, name: str, socket_path: str, transcript: Transcript | None = None) -> None:
        self.name = name
        self.socket_path = socket_path
        self.state = VMState.DETACHED
        self._session = QMPSession(name, socket_path, transcript)
        self._info: VMInfo | None = None
        # The statistics interval this connection set or found (QEMU keeps it until a
        # client changes it, and QEMU serves one client at a time): no need to ask again.
        self._stats_interval_s: int | None = None

    # -- lifecycle ---------------------------------------------------------------
    async def attach(self) -> VMInfo:
        """Connect over QMP and learn pid, accelerator, RAM size and location."""
        if self.state is not VMState.DETACHED:
            raise VMError(self.name, f"cannot attach a handle that is {self.state.value}")
        await self._open()
        self.state = VMState.ATTACHED
        self._stats_interval_s = None
        try:
            self._info = await self._discover()
        except BaseException:
            await self.detach()
            raise
        return self._info

    async def _open(self) -> None:
        """Connect to the VM (another backend connects its own way: hv.libvirt)."""
        await self._session.open()

    async def detach(self) -> None:
        """Close the QMP connection; the VM keeps running."""
        await self._session.close()
        if self.state is VMState.ATTACHED:
            self.state = VMState.DETACHED

    async def __aenter__(self) -> "VM":
        await self.attach()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.detach()

    @property
    def info(self) -> VMInfo:
        if self._info is None or self.state is not VMState.ATTACHED:
            raise VMError(self.name, f"handle is {self.state.value}; attach first")
        return self._info

    async def _cmd(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self.state is not VMState.ATTACHED:
            raise VMError(self.name, f"cannot run {command!r}: handle is {self.state.value}")
        try:
            return await self._session.execute(command, arguments)
        except VMGone:
            self.state = VMState.GONE
            raise

    async def _discover(self) -> VMInfo:
        pid = self._session.pid
        assert pid is not None
        name = self.name
        kvm = answers.record(name, "query-kvm", await self._cmd("query-kvm"))
        accel = "kvm" if answers.boolean(name, "query-kvm", kvm, "enabled") else "tcg"
        command = "query-memory-size-summary"
        summary = answers.record(name, command, await self._cmd(command))
        ram_bytes = (answers.integer(name, command, summary, "base-memory", minimum=1)
                     + answers.integer(name, command, summary, "plugged-memory", default=0))
        ram = await self._ram_ranges()
        balloon = await self._find_balloon()
        doom = False
        if balloon is not None:
            doom = answers.scalar_bool(
                name, "qom-get", await self._cmd("qom-get", {"path": balloon, "property": "deflate-on-oom"}),
                "deflate-on-oom")
        return VMInfo(self.name, str(self.socket_path), pid, accel, ram_bytes, ram, balloon, doom)

    async def _ram_ranges(self) -> tuple[RamRange, ...]:
        """Where guest RAM (the block at guest physical 0) lives in the QEMU process."""
        where = _GPA2HVA_RE.search(await self._hmp("gpa2hva 0"))
        if where is None:
            raise QMPError(self.name, "cannot locate guest RAM: gpa2hva 0 gave no address")
        block, hva = where.group(1), int(where.group(2), 16)
        sizes = {m.group(1): int(m.group(3), 16)
                 for m in _RAMBLOCK_RE.finditer(await self._hmp("info ramblock"))}
        if block not in sizes:
            raise QMPError(self.name, f"cannot locate guest RAM: block {block!r} not in info ramblock")
        size = sizes[block]
        if not (0 < size and hva % PAGE_SIZE == 0 and hva + size <= ADDRESS_SPACE_END):
            raise answers.malformed(self.name, "human-monitor-command gpa2hva/info ramblock",
                                    f"guest RAM {block!r} at 0x{hva:x}, size", size)
        return (RamRange(block, hva, size),)

    async def _find_balloon(self) -> str | None:
        """QOM path of the virtio-balloon device, wherever it was plugged."""
        for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
            try:
                answer = await self._cmd("qom-list", {"path": parent})
            except QMPError:
                continue  # no such container in this machine
            for child in answers.listing(self.name, "qom-list", answer):
                kind = answers.string(self.name, "qom-list", child, "type")
                if kind in ("child<virtio-balloon-pci>", "child<virtio-balloon-ccw>",
                                     "child<virtio-balloon-device>"):
                    return f"{parent}/{answers.string(self.name, 'qom-list', child, 'name')}"
        return None

    # -- balloon -----------------------------------------------------------------
    def _require_balloon(self) -> str:
        path = self.info.balloon_path
        if path is None:
            raise VMError(self.name, "has no virtio-balloon device")
        return path

    async def balloon_actual(self) -> int:
        """The guest's current memory as QEMU sees it (RAM size minus balloon), bytes."""
        self._require_balloon()
        answer = answers.record(self.name, "query-balloon", await self._cmd("query-balloon"))
        return answers.integer(self.name, "query-balloon", answer, "actual")

    async def check_balloon_target(self, target_bytes: int, *, force: bool = False) -> None:
        """Refuse a target above the VM's RAM or below the safe floor (see README)."""
        ram = self.info.ram_bytes
        if target_bytes > ram:
            raise UsageError(f"{self.name}: balloon target {format_size(target_bytes)} is above "
                             f"the VM's maximum {format_size(ram)}")
        floor = balloon_floor(ram)
        if target_bytes < floor:
            raise UsageError(f"{self.name}: balloon target {format_size(target_bytes)} is below "
                             f"the safe floor {format_size(floor)} for a {format_size(ram)} guest")
        if force:
            return
        # A guest that sends no statistics has no running balloon driver either, so
        # the target could not be reached anyway; the floor above still applies.
        stats = await self.guest_stats(max_age_s=STATS_POLL_INTERVAL_S + 1)
        actual = await self.balloon_actual()
        if stats.total_bytes is None:
            return
        # The guest's MemTotal leaves out what its kernel reserved at boot ("hidden").
        # Without deflate-on-oom, ballooned pages leave MemTotal too; with it they stay
        # in MemTotal and count as used.
        if self.info.deflate_on_oom:
            need = guest_need_bytes(stats, ram - stats.total_bytes, ram - actual)
        else:
            need = guest_need_bytes(stats, actual - stats.total_bytes)
        if need is not None and target_bytes < need:
            raise UsageError(
                f"{self.name}: balloon target {format_size(target_bytes)} is below what the guest "
                f"needs ({format_size(need)}: in use + kernel-reserved + "
                f"{format_size(HEADROOM_BYTES)} headroom); use --force to balloon anyway")

    async def set_balloon(self, target_bytes: int, *, force: bool = False) -> None:
        """Ask the guest to shrink or grow to ``target_bytes`` (checked first)."""
        self._require_balloon()
        await self.check_balloon_target(target_bytes, force=force)
        await self._cmd("balloon", {"value": int(target_bytes)})

    async def wait_balloon(self, target_bytes: int, timeout_s: float,
                           tolerance_bytes: int = 4 * MiB) -> int:
        """Poll until the balloon's actual size is within tolerance of the target."""
        deadline = time.monotonic() + timeout_s
        while True:
            actual = await self.balloon_actual()
            if abs(actual - target_bytes) <= tolerance_bytes:
                return actual
            if time.monotonic() >= deadline:
                raise VMError(self.name, f"balloon reached {format_size(actual)}, not "
                              f"{format_size(target_bytes)}, within {timeout_s:.0f} s")
            await asyncio.sleep(0.25)

    async def enable_stats(self, interval_s: int = STATS_POLL_INTERVAL_S) -> None:
        """Ask the guest to send statistics every ``interval_s`` (if not already)."""
        path = self._require_balloon()
        known = self._stats_interval_s
        if known is not None and 0 < known <= interval_s:
            return  # asked or checked on this connection already (once per tick saved)
        current = answers.scalar_int(
            self.name, "qom-get", await self._cmd("qom-get", {"path": path,
                                                              "property": "guest-stats-polling-interval"}),
            "guest-stats-polling-interval")
        if current != interval_s and (current == 0 or current > interval_s):
            await self._cmd("qom-set", {"path": path, "property": "guest-stats-polling-interval",
                                        "value": interval_s})
            current = interval_s
        self._stats_interval_s = current

    async def guest_stats(self, wait_s: float = 2 * STATS_POLL_INTERVAL_S + 1,
                          max_age_s: float | None = None) -> GuestStats:
        """The guest's statistics.

        Enables polling, then waits up to ``wait_s`` for a report (one no older than
        ``max_age_s`` if given); returns all-``None`` figures if none comes.
        """
        path = self._require_balloon()
        await self.enable_stats()
        deadline = time.monotonic() + wait_s
        while True:
            raw = answers.record(self.name, "qom-get guest-stats",
                                 await self._cmd("qom-get", {"path": path, "property": "guest-stats"}))
            last = answers.integer(self.name, "qom-get guest-stats", raw, "last-update", default=0)
            fresh = last and (max_age_s is None or time.time() - last <= max_age_s)
            if fresh or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
        values = answers.record(self.name, "qom-get guest-stats", raw.get("stats", {})) if fresh else {}

        def get(key: str) -> int | None:
            # The guest's figures; QEMU sends -1 (or its uint64 form) for one it lacks.
            v = answers.integer(self.name, "qom-get guest-stats", values, key, minimum=-1,
                                maximum=UINT64_MAX, default=-1)
            return None if v in (-1, UINT64_MAX) else v

        fields = {name: get(key) for name, key in _STAT_KEYS.items()}
        return GuestStats(**fields, age_s=(time.time() - last) if fresh else None)

    async def _hmp(self, command_line: str) -> str:
        out = await self._cmd("human-monitor-command", {"command-line": command_line})
        return answers.text(self.name, f"human-monitor-command {command_line}", out)

    # -- run state ---------------------------------------------------------------
    async def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ..."""
        answer = answers.record(self.name, "query-status", await self._cmd("query-status"))
        return answers.string(self.name, "query-status", answer, "status")

    async def pause(self) -> None:
        await self._cmd("stop")

    async def resume(self) -> None:
        await self._cmd("cont")

    async def quit(self) -> None:
        """Ask QEMU to exit; the connection dropping is the expected answer."""
        try:
            await self._cmd("quit")
        except VMGone:
            pass
        self.state = VMState.GONE
        await self._session.close()

    # -- page sharing (issue 9) ----------------------------------------------------
    async def ram_backend(self) -> str:
        """QOM path of the memory backend holding guest RAM: ``/objects/ID``, where ID is
        the RAM block's name (``-object memory-backend-*,id=ram0``, or the ``pc.ram``
        QEMU creates for a plain ``-m``)."""
        block = self.info.ram[0].block
        for child in await self._cmd("qom-list", {"path": "/objects"}):
            if child["name"] == block and str(child["type"]).startswith("child<memory-backend"):
                return f"/objects/{block}"
        raise VMError(self.name, f"no memory backend /objects/{block} for RAM block {block!r}")

    async def merge(self) -> bool:
        """Whether guest RAM is open to KSM (the backend's ``merge`` property)."""
        path = await self.ram_backend()
        return bool(await self._cmd("qom-get", {"path": path, "property": "merge"}))

    async def set_merge(self, on: bool) -> str:
        """Open guest RAM to KSM, or take it out live: QEMU madvises the whole backend
        MADV_UNMERGEABLE, which unmerges every page KSM merged.  Returns the backend."""
        path = await self.ram_backend()
        await self._cmd("qom-set", {"path": path, "property": "merge", "value": on})
        return path

    # -- host side ---------------------------------------------------------------
    def host_usage(self) -> proc.RangeUsage:
        """Resident and swapped bytes of guest RAM in the host (from smaps)."""
        info = self.info
        total = proc.RangeUsage(0, 0, 0)
        for r in info.ram:
            u = proc.range_usage(info.pid, r.hva, r.size, self.name)
            total = proc.RangeUsage(total.rss_bytes + u.rss_bytes, total.swap_bytes + u.swap_bytes,
                                    total.anon_huge_bytes + u.anon_huge_bytes)
        return total


__all__ = ["VM", "VMInfo", "VMState", "RamRange", "GuestStats", "balloon_floor",
           "guest_need_bytes"]
