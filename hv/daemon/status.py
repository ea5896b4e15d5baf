"""The daemon's published status: what the last tick saw, for `hv status` and other readers.

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

from hv import paths
from hv.host import proc

__all__ = ["status_file", "running_status", "publish"]


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


def publish(state: str, free_bytes: int, pool_bytes: int, vms: dict[str, Any],
            tick: int | None = None) -> None:
    """Write the snapshot atomically (``tick``: the number of the tick that wrote it)."""
    pid = os.getpid()
    paths.write_json_atomic(status_file(), {
        "pid": pid, "started": _started(pid), "time": time.time(), "state": state,
        "tick": tick, "free_bytes": free_bytes, "pool_bytes": pool_bytes, "vms": vms})
