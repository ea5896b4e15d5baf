"""The daemon's published status: what the last tick saw, for `hv status` and other readers.

The snapshot (one JSON object, :func:`publish`): ``pid``, ``started``, ``time``,
``version``, ``state``, ``free_bytes``, ``pool_bytes``, ``tick`` (ticks so far),
``tick_seconds`` (the last tick) and ``tick_seconds_total``, ``admission_refusals``,
``ksm`` (:meth:`~hv.daemon.sharing.SharingService.observe`, or None when sharing is
off) and ``vms``, one :func:`vm_row` per managed VM.  Readers (``hv status``,
``hv share --cached``, ``hv top``, the metrics and dashboard server of :mod:`hv.ops`)
take it as it is; only this module writes it.

``hv run`` holds every VM's QMP socket (QEMU serves one client at a time), so other
commands read this snapshot instead of asking QEMU.  It names the daemon by pid *and*
the process's start time, so a reused pid is never taken for a running daemon.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from hv import __version__, paths
from hv.daemon.managed import ManagedVM
from hv.host import proc
from hv.policy.reclaim import policy_active_fraction

__all__ = ["status_file", "running_status", "vm_row", "publish"]


def status_file() -> Path:
    """The daemon's last tick, as JSON (see :func:`publish`)."""
    return paths.state_dir() / "daemon" / "status.json"


def _started(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19])


def running_status() -> dict[str, Any] | None:
    """The snapshot of a running ``hv run``, or None if no daemon is running."""
    try:
        snapshot: dict[str, Any] = json.loads(status_file().read_text())
        pid = int(snapshot["pid"])
        alive = proc.alive(pid) and isinstance(snapshot["vms"], dict)
        started = snapshot.get("started")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none written yet, torn, or not ours
    if alive and started is not None and started != _started(pid):
        return None  # the pid was reused by another process
    return snapshot if alive else None


def vm_row(m: ManagedVM, sharing: dict[str, Any] | None) -> dict[str, Any]:
    """One VM of the snapshot: its limits, what hv read and decided, what it did.

    ``sharing`` is the VM's row of the KSM service's last index (None: not scanned).
    """
    r, est, info = m.reading, m.estimator, m.vm.info
    allocated = min(r.resident_bytes, m.max_bytes) if r else m.max_bytes
    return {
        "socket": m.vm.socket_path, "pid": m.pid, "configured_bytes": info.ram_bytes,
        "max_bytes": m.max_bytes, "min_bytes": m.cfg.min_bytes, "shares": m.cfg.shares,
        "target_bytes": m.target_bytes, "paused_by_hv": m.paused_by_hv,
        "active_fraction": est.active_fraction,
        "active": {"slow": est.slow, "fast": est.fast, "current": est.current,
                   "used": policy_active_fraction(est.active_fraction, m.measured_pages,
                                                  allocated)},
        "balloon_bytes": r.balloon_bytes if r else None,
        "host_resident_bytes": r.resident_bytes if r else None,
        "host_swap_bytes": r.swap_bytes if r else None,
        "run_state": r.run_state if r else None,
        "guest": r.guest.as_dict() if r else None,
        "failing": m.failing,
        "actions": dict(m.actions), "paged_out_pages": m.paged_out_pages,
        "sharing": sharing,
        "ram": [{"block": x.block, "hva": x.hva, "size": x.size} for x in info.ram]}


def publish(**snapshot: Any) -> dict[str, Any]:
    """Write the snapshot atomically (the keys of the module docstring, but for ``pid``,
    ``started``, ``time`` and ``version``, which this adds); returns what it wrote."""
    pid = os.getpid()
    out = {"pid": pid, "started": _started(pid), "time": time.time(), "version": __version__,
           **snapshot}
    paths.write_json_atomic(status_file(), out)
    return out
