"""A libvirt domain behind hv's VM handle, for VMs whose QMP monitor libvirtd holds.

    async with Domain(parse_ref("libvirt:web")) as vm:   # a hv.qemu.vm.VM
        print(vm.info.pid, vm.info.ram)
        await vm.set_balloon(128 * MiB)

:class:`Domain` is a :class:`~hv.qemu.vm.VM`: policy, sampler, sharing and daemon code
hold either and never ask which.  What each operation becomes:

- balloon target: ``virDomainSetMemoryFlags(AFFECT_LIVE)``; its actual size and the
  guest's statistics: ``virDomainMemoryStats`` (after ``virDomainSetMemoryStatsPeriod``
  when the period is 0);
- pause, resume and run state: ``suspend``, ``resume``, ``state``;
- the QEMU pid: libvirt's pid file ``/run/libvirt/qemu/NAME.pid``, checked against the
  domain (its ``-uuid`` on the QEMU command line), so only domains of the local
  ``qemu:///system`` are managed;
- where guest RAM lives in QEMU: one HMP ``gpa2hva 0`` and ``info ramblock`` through
  libvirt-qemu's monitor passthrough, cached per QEMU process.  libvirt marks a domain
  whose monitor was used so as "tainted: custom-monitor" (a line in its log; nothing
  else changes);
- ``<memoryBacking><nosharepages/>``: QEMU leaves its RAM unmergeable; hv's sharing
  sees that on the mapping itself (:func:`hv.host.proc.mergeable`) and shows the domain
  as opted out.

libvirt's calls block: each runs in a worker thread, and each error becomes an
:class:`~hv.errors.HvError` (:mod:`hv.libvirt.errors`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from hv.errors import HostError, LibvirtError, VMError, VMGone, VMNotFound
from hv.host import proc
from hv.libvirt.domxml import DomainXml, parse_domain_xml
from hv.libvirt.errors import connect_error, from_libvirt
from hv.libvirt.naming import DomainRef
from hv.qemu.vm import (
    STATS_POLL_INTERVAL_S,
    VM,
    GuestStats,
    RamRange,
    VMInfo,
    VMState,
)

__all__ = ["Domain", "Lister", "PID_DIR", "binding"]

PID_DIR = "/run/libvirt/qemu"  # where libvirtd's qemu:///system driver writes NAME.pid

T = TypeVar("T")

# libvirt's memoryStats keys (KiB) -> GuestStats fields.  libvirt divides the guest's
# byte counts by 1024 (swap too); hv's QMP backend keeps QEMU's raw figures, so these
# are multiplied back to match.
_KIB_STATS = {"total_bytes": "available", "free_bytes": "unused", "available_bytes": "usable",
              "disk_caches_bytes": "disk_caches", "swap_in_bytes": "swap_in",
              "swap_out_bytes": "swap_out"}
_COUNT_STATS = {"major_faults": "major_fault", "minor_faults": "minor_fault"}

# QEMU's RAM layout never changes while the process lives: (pid, start time) -> ranges.
_RAM_CACHE: dict[tuple[int, int], tuple[RamRange, ...]] = {}

_binding: Any = None


def binding() -> Any:
    """The ``libvirt`` module (Debian's python3-libvirt or libvirt-python), quietened:
    libvirt prints every error to stderr unless a handler takes it."""
    global _binding
    if _binding is None:
        try:
            import libvirt  # type: ignore[import-untyped]
        except ImportError as exc:
            raise HostError("the libvirt Python binding is not installed "
                            "(bash scripts/setup.sh --with-libvirt)") from exc
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _binding = libvirt
    return _binding


def _code(exc: Exception) -> tuple[int | None, str]:
    get = getattr(exc, "get_error_code", None)
    return (get() if get is not None else None), str(exc)


def open_connection(name: str, uri: str) -> Any:
    """``libvirt.open(uri)``, or the HvError saying why not (blocking)."""
    lv = binding()
    try:
        return lv.open(uri)
    except lv.libvirtError as exc:
        raise connect_error(name, uri, *_code(exc)) from exc


class Lister:
    """The running domains at one URI, over one connection kept open from call to call
    (``hv run`` lists them every tick) and opened again once if it died (libvirtd
    stopped or restarted).  Blocking calls."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None

    def active(self) -> list[str]:
        lv = binding()
        for attempt in range(2):
            if self._conn is None:
                self._conn = open_connection(f"libvirt {self.uri}", self.uri)
            try:
                return sorted(d.name() for d in
                              self._conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
            except lv.libvirtError as exc:
                self.close()
                if attempt:
                    raise from_libvirt(f"libvirt {self.uri}", "listing domains",
                                       *_code(exc)) from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(conn)


def _method(name: str) -> Callable[..., Any]:
    """``f(obj, *args)`` calling ``obj.name(*args)``: a domain method for
    :meth:`Domain._on_dom`, looked up on whichever handle is live then."""
    return lambda obj, *args: getattr(obj, name)(*args)


def _close_quietly(conn: Any) -> None:
    """Close a connection; teardown must not raise (libvirtd may be gone)."""
    try:
        conn.close()
    except Exception:  # noqa: BLE001
        pass


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


class Domain(VM):
    """A handle on one running libvirt domain (see the module docstring)."""

    def __init__(self, ref: DomainRef, name: str | None = None) -> None:
        super().__init__(name or ref.name, ref.address)
        self.ref = ref
        self.xml: DomainXml | None = None
        self._conn: Any = None
        self._dom: Any = None
        self._uuid: str | None = None  # to find the domain again on a new connection

    # -- libvirt calls -------------------------------------------------------------
    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking libvirt call in a thread; its error as an HvError."""
        if self.state is VMState.GONE:
            raise VMGone(self.name, f"cannot {what}: the domain has gone")
        lv = binding()
        try:
            return await asyncio.to_thread(fn, *args)
        except lv.libvirtError as exc:
            err = from_libvirt(self.name, what, *_code(exc))
            if isinstance(err, VMNotFound) and self._dom is not None:
                # Found at attach, unknown now: a transient domain that was destroyed.
                err = VMGone(self.name, "the domain has gone (destroyed)")
            if isinstance(err, VMGone):
                self.state = VMState.GONE
            raise err from exc

    async def _on_dom(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(domain, *args)`` on the live domain; if libvirtd restarted since the
        connection was opened, once more on a new connection."""
        try:
            return await self._call(what, fn, self._live(), *args)
        except LibvirtError:
            if not await self._reconnect():
                raise
        return await self._call(what, fn, self._live(), *args)

    async def _reconnect(self) -> bool:
        """A new connection and domain handle if the old connection died (libvirtd
        stopped or restarted; QEMU keeps running).  False if it is alive: the error was
        the call's own.  Raises if libvirtd does not answer, or the domain is gone."""
        conn = self._conn
        try:
            alive = conn is not None and bool(await asyncio.to_thread(conn.isAlive))
        except Exception:  # noqa: BLE001 - a dead connection may fail even this
            alive = False
        if alive or self._uuid is None:
            return False
        fresh = await asyncio.to_thread(open_connection, self.name, self.ref.uri)
        try:
            dom = await self._call("look the domain up again", fresh.lookupByUUIDString,
                                   self._uuid)
        except BaseException:
            await asyncio.to_thread(fresh.close)
            raise
        self._conn, self._dom = fresh, dom
        if conn is not None:
            await asyncio.to_thread(_close_quietly, conn)
        return True

    async def _cmd(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """libvirtd holds the domain's QMP monitor: any QMP-only path of VM is a bug here."""
        raise VMError(self.name, f"QMP {command!r} is not available through libvirt")

    def _live(self) -> Any:
        if self.state is not VMState.ATTACHED or self._dom is None:
            raise VMError(self.name, f"handle is {self.state.value}; attach first")
        return self._dom

    # -- lifecycle -----------------------------------------------------------------
    async def _open(self) -> None:
        """Connect to libvirt and look the running domain up (VM.attach does the rest)."""
        self._conn = await asyncio.to_thread(open_connection, self.name, self.ref.uri)
        try:
            self._dom = await self._call("look up the domain", self._conn.lookupByName,
                                         self.ref.domain)
            if not await self._call("read its state", self._dom.isActive):
                raise VMGone(self.name, "the domain is not running (shut off)")
            self._uuid = await self._call("read its UUID", self._dom.UUIDString)
        except BaseException:
            await self.detach()
            raise

    async def detach(self) -> None:
        """Close the libvirt connection; the domain keeps running."""
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            await asyncio.to_thread(_close_quietly, conn)
        if self.state is VMState.ATTACHED:
            self.state = VMState.DETACHED

    async def _discover(self) -> VMInfo:
        self.xml = await self.read_xml()
        uuid = await self._on_dom("read its UUID", _method("UUIDString"))
        pid = self._pid(uuid)
        ram = await self._ram_ranges_of(pid)
        model = self.xml.balloon_model
        return VMInfo(self.name, self.ref.address, pid, self.xml.accel, self.xml.memory_bytes,
                      ram, f"memballoon[{model}]" if model else None, self.xml.deflate_on_oom)

    async def read_xml(self) -> DomainXml:
        """The live domain XML as it is now (hv's policy metadata included)."""
        return parse_domain_xml(await self._on_dom("read its XML", _method("XMLDesc"), 0),
                                self.name)

    def _pid(self, uuid: str) -> int:
        """QEMU's pid from libvirt's pid file, refused unless that process is this domain."""
        path = os.path.join(PID_DIR, f"{self.ref.domain}.pid")
        try:
            with open(path) as f:
                pid = int(f.read().strip())
        except FileNotFoundError:
            raise LibvirtError(self.name, f"no pid file {path}: hv manages the domains of this "
                               f"host's qemu:///system only (connected to {self.ref.uri})") from None
        except (OSError, ValueError) as exc:
            raise LibvirtError(self.name, f"cannot read the QEMU pid from {path}: {exc}") from exc
        argv = proc.cmdline(pid)
        if not argv:
            raise VMGone(self.name, f"QEMU (pid {pid} in {path}) has exited")
        if uuid not in argv:
            raise LibvirtError(self.name, f"pid {pid} in {path} is not this domain's QEMU "
                               f"(no -uuid {uuid} on its command line)")
        return pid

    async def _ram_ranges_of(self, pid: int) -> tuple[RamRange, ...]:
        """Where guest RAM lives (:meth:`VM._ram_ranges`, its HMP through libvirt), once
        per QEMU process."""
        key = (pid, _start_time(pid))
        if key not in _RAM_CACHE:
            _RAM_CACHE[key] = await self._ram_ranges()
        return _RAM_CACHE[key]

    async def _hmp(self, command: str) -> str:
        """One HMP command through libvirt-qemu's monitor passthrough."""
        try:
            import libvirt_qemu  # type: ignore[import-untyped]
        except ImportError as exc:
            raise HostError("the libvirt_qemu Python module is missing "
                            "(bash scripts/setup.sh --with-libvirt)") from exc
        out = await self._on_dom(f"HMP {command!r}", libvirt_qemu.qemuMonitorCommand,
                                 command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return str(out)

    # -- balloon -------------------------------------------------------------------
    async def _memory_stats(self) -> dict[str, int]:
        self._require_balloon()
        stats: dict[str, int] = await self._on_dom("read memory statistics",
                                                   _method("memoryStats"))
        return stats

    async def balloon_actual(self) -> int:
        """The guest's current memory as libvirt sees it (``actual``), bytes."""
        stats = await self._memory_stats()
        if "actual" not in stats:
            raise LibvirtError(self.name, "libvirt reports no balloon size (actual)")
        return int(stats["actual"]) * 1024

    async def set_balloon(self, target_bytes: int, *, force: bool = False) -> None:
        """Ask the guest to shrink or grow to ``target_bytes`` (checked first)."""
        self._require_balloon()
        await self.check_balloon_target(target_bytes, force=force)
        lv = binding()
        await self._on_dom("set the balloon target", _method("setMemoryFlags"),
                         int(target_bytes) // 1024, lv.VIR_DOMAIN_AFFECT_LIVE)

    async def enable_stats(self, interval_s: int = STATS_POLL_INTERVAL_S) -> None:
        """Have the guest send statistics every ``interval_s`` unless it already does
        at least as often (the period is in the live XML)."""
        self._require_balloon()
        known = self._stats_interval_s
        if known is not None and 0 < known <= interval_s:
            return
        current = (await self.read_xml()).stats_period_s
        if current == 0 or current > interval_s:
            lv = binding()
            try:
                await self._on_dom("set the balloon statistics period",
                                   _method("setMemoryStatsPeriod"), interval_s,
                                 lv.VIR_DOMAIN_AFFECT_LIVE)
            except LibvirtError as exc:
                raise LibvirtError(self.name, f"cannot set the balloon statistics period to "
                                   f"{interval_s} s: {str(exc).split(': ', 2)[-1]}",
                                   exc.code) from exc
            current = interval_s
        self._stats_interval_s = current

    async def guest_stats(self, wait_s: float = 2 * STATS_POLL_INTERVAL_S + 1,
                          max_age_s: float | None = None) -> GuestStats:
        """The guest's statistics, as :meth:`VM.guest_stats` (all None if none come)."""
        await self.enable_stats()
        deadline = time.monotonic() + wait_s
        while True:
            raw = await self._memory_stats()
            last = int(raw.get("last_update", 0))
            fresh = bool(last) and (max_age_s is None or time.time() - last <= max_age_s)
            if fresh or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
        values = raw if fresh else {}
        fields: dict[str, int | None] = {}
        for field, key in _KIB_STATS.items():
            fields[field] = int(values[key]) * 1024 if key in values else None
        for field, key in _COUNT_STATS.items():
            fields[field] = int(values[key]) if key in values else None
        return GuestStats(**fields, age_s=(time.time() - last) if fresh else None)

    # -- run state -----------------------------------------------------------------
    async def status(self) -> str:
        """``running``, ``paused``, ``shutoff``, ... from libvirt's domain state."""
        lv = binding()
        state, _reason = await self._on_dom("read its state", _method("state"))
        names = {lv.VIR_DOMAIN_RUNNING: "running", lv.VIR_DOMAIN_PAUSED: "paused",
                 lv.VIR_DOMAIN_BLOCKED: "running", lv.VIR_DOMAIN_SHUTDOWN: "shutdown",
                 lv.VIR_DOMAIN_SHUTOFF: "shutoff", lv.VIR_DOMAIN_CRASHED: "crashed",
                 lv.VIR_DOMAIN_PMSUSPENDED: "suspended"}
        return names.get(state, "unknown")

    async def pause(self) -> None:
        await self._on_dom("suspend", _method("suspend"))

    async def resume(self) -> None:
        await self._on_dom("resume", _method("resume"))

    async def quit(self) -> None:
        """Destroy the domain (QMP's ``quit``: QEMU exits now)."""
        await self._on_dom("destroy", _method("destroy"))
        self.state = VMState.GONE
        await self.detach()
