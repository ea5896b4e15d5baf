"""Other memory tuners on the host, which would fight ``hv run`` over KSM and balloons.

- ``ksmtuned`` (Fedora/RHEL's ``ksm`` package) rewrites ``/sys/kernel/mm/ksm/run``,
  ``pages_to_scan`` and ``sleep_millisecs`` every minute: hv's governor sets them too.
- ``momd`` (oVirt's Memory Overcommitment Manager; on oVirt hosts the ``mom-vdsm``
  service runs it for vdsm) sets balloon targets and KSM through libvirt/vdsm.

Both run as scripts, so the kernel names the process after the script (``comm``), and
the script's path is in its command line either way (``/usr/bin/python3 /usr/sbin/momd``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hv.host import proc

__all__ = ["Tuner", "KNOWN", "running_tuners", "describe"]

# Process name -> what it would fight hv over.
KNOWN: dict[str, str] = {
    "ksmtuned": "KSM's tunables",
    "momd": "balloon targets and KSM",
}


@dataclass(frozen=True)
class Tuner:
    pid: int
    name: str
    fights_over: str


def _name_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return None
    if comm in KNOWN:
        return comm
    # A script started through its interpreter: python3 /usr/sbin/momd -c ...
    for arg in proc.cmdline(pid)[:2]:
        base = os.path.basename(arg)
        if base in KNOWN:
            return base
    return None


def running_tuners() -> list[Tuner]:
    """Every running process of a known tuner, by pid."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        name = _name_of(int(entry.name))
        if name is not None and proc.alive(int(entry.name)):
            found.append(Tuner(int(entry.name), name, KNOWN[name]))
    return sorted(found, key=lambda t: t.pid)


def describe(tuners: list[Tuner]) -> str:
    """``ksmtuned (pid 12, KSM's tunables), momd (pid 40, ...)``."""
    return ", ".join(f"{t.name} (pid {t.pid}, {t.fights_over})" for t in tuners)
