"""A fleet of guests for one experiment: boot them, wait for them, always stop them.

    async with Fleet(specs, progress) as fleet:   # boots, waits for event=ready
        pids = [vm.pid for vm in fleet.vms]
    # every guest it started is stopped here, even after an error or ^C

Also the guests' console events (``hv-guest: event=NAME k=v ...`` lines, written by
the guest image's init and workloads) and the one check every experiment makes
first: no ``hv run`` on the host (it would own KSM, the VMs' QMP sockets and their
balloons).  That check reads the daemon's *published* status, as ``hv status`` does.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from hv.published import running_status
from hv.errors import HostError, HvError
from hv.qemu import accel as accel_mod
from hv.qemu import launch as launcher
from hv.qemu.vm import VMInfo

__all__ = ["BOOT_TIMEOUT_S", "Progress", "Fleet", "console_events", "wait_event",
           "refuse_if_daemon"]

# TCG: the initramfs boots in ~5 s, Debian to multi-user in ~22 s; slower several at once.
BOOT_TIMEOUT_S = 240.0

Progress = Callable[[str], None]

_EVENT_RE = re.compile(r"(\w+)=(\S+)")


def refuse_if_daemon(what: str) -> None:
    """Raise unless no ``hv run`` is running (from the daemon's published status)."""
    snapshot = running_status()
    if snapshot is not None:
        raise HostError(f"`hv run` (pid {snapshot['pid']}) manages this host: stop it "
                        f"before {what}")


def events_in(log: Path, event: str) -> list[dict[str, str]]:
    """The ``hv-guest: event=EVENT k=v ...`` lines of a console log so far, parsed into
    key/value pairs.  Only whole lines: QEMU may be writing the last one."""
    if not log.exists():
        return []
    out = []
    text = log.read_text(errors="replace")
    for line in text[:text.rfind("\n") + 1].splitlines():
        at = line.find("hv-guest:")  # a Debian console may print something first
        if at >= 0 and f"event={event}" in line[at:].split():
            out.append(dict(_EVENT_RE.findall(line[at:])))
    return out


def console_events(name: str, event: str) -> list[dict[str, str]]:
    """The guest's ``event=EVENT`` console lines so far (:func:`events_in`)."""
    return events_in(launcher.console_log(name), event)


async def wait_event(name: str, event: str, timeout_s: float) -> dict[str, str]:
    """The last ``event=EVENT`` line of the guest's console, waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (found := console_events(name, event)):
        if time.monotonic() > deadline:
            raise HvError(f"{name}: no event={event} on its console in {timeout_s:.0f} s "
                          f"(see {launcher.console_log(name)})")
        await asyncio.sleep(0.5)
    return found[-1]


@dataclass(frozen=True)
class GuestPlan:
    """One guest of the fleet, as a user would launch it (``hv launch``)."""

    name: str
    mem_bytes: int
    workload: str = "idle"
    params: tuple[tuple[str, str], ...] = ()
    initrd: Path | None = None
    disk: Path | None = None
    thp: bool = True  # transparent huge pages for guest RAM, as QEMU asks by default


class Fleet:
    """Boots the planned guests (in order), waits until each is ready, stops them all."""

    def __init__(self, plans: Sequence[GuestPlan], progress: Progress = lambda s: None,
                 boot_timeout_s: float = BOOT_TIMEOUT_S) -> None:
        self.plans = list(plans)
        self.progress = progress
        self.boot_timeout_s = boot_timeout_s
        self.vms: list[VMInfo] = []
        self._started: list[str] = []

    async def __aenter__(self) -> "Fleet":
        try:
            await self.boot()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def boot(self) -> None:
        verdict = accel_mod.choose()
        for plan in self.plans:
            spec = launcher.GuestSpec(
                name=plan.name, mem_bytes=plan.mem_bytes, workload=plan.workload,
                params=dict(plan.params), accel=verdict.accel,
                initrd=str(plan.initrd) if plan.initrd else None,
                disk=str(plan.disk) if plan.disk else None, thp=plan.thp)
            self._started.append(plan.name)
            vm = await launcher.launch(spec)
            self.vms.append(vm.info)
            await vm.detach()
        for plan in self.plans:
            await wait_event(plan.name, "ready", self.boot_timeout_s)
        self.progress(f"booted {', '.join(p.name for p in self.plans)} ({verdict.accel})")

    async def stop(self) -> None:
        """Stop every guest this fleet started (a guest that never came up included)."""
        for name in reversed(self._started):
            await launcher.stop(name)
        self._started.clear()
