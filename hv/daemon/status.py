"""The daemon's published status: what the last tick saw, written every tick.

The snapshot (one JSON object, :func:`publish`): ``pid``, ``started``, ``time``,
``version``, ``state``, ``free_bytes``, ``pool_bytes``, ``tick`` (ticks so far),
``tick_seconds`` (the last tick) and ``tick_seconds_total``, ``admission_refusals``,
``ksm`` (:meth:`~hv.daemon.sharing.SharingService.observe`, or None when sharing is
off) and ``vms``, one :func:`vm_row` per managed VM.  Readers (``hv status``,
``hv share --cached``, ``hv top``, the server of ``hv run --metrics``)
take it as it is, through :mod:`hv.published` (where it is, and whether its writer
is alive); only this module writes it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hv import __version__, paths
from hv.daemon.managed import ManagedVM
from hv.errors import HostError
from hv.policy.reclaim import policy_active_fraction
from hv.published import running_status, started, status_file
from hv.sharing import optout

__all__ = ["status_file", "running_status", "vm_row", "publish"]


def vm_row(m: ManagedVM, sharing: dict[str, Any] | None) -> dict[str, Any]:
    """One VM of the snapshot: its limits, what hv read and decided, what it did.

    ``sharing`` is the VM's row of the KSM service's last index (None: not scanned).
    """
    r, est, info = m.reading, m.estimator, m.vm.info
    allocated = min(r.resident_bytes, m.max_bytes) if r else m.max_bytes
    return {
        "socket": m.vm.socket_path, "pid": m.pid, "configured_bytes": info.ram_bytes,
        "max_bytes": m.max_bytes, "min_bytes": m.cfg.min_bytes, "shares": m.cfg.shares,
        "policy": {"min_bytes": m.cfg.min_bytes, "max_bytes": m.max_bytes,
                   "shares": m.cfg.shares, "source": m.policy_source},
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
        "ksm": None if m.merge is None else "on" if m.merge else optout.OPTED_OUT,
        "actions": dict(m.actions), "paged_out_pages": m.paged_out_pages,
        "sharing": sharing,
        "ram": [{"block": x.block, "hva": x.hva, "size": x.size} for x in info.ram]}


def publish(**snapshot: Any) -> dict[str, Any]:
    """Write the snapshot atomically (the keys of the module docstring, but for ``pid``,
    ``started``, ``time`` and ``version``, which this adds); returns what it wrote.

    HostError if it cannot be written (a full disk): the last one written stays whole.
    """
    pid = os.getpid()
    out = {"pid": pid, "started": started(pid), "time": time.time(), "version": __version__,
           **snapshot}
    try:
        paths.write_json_atomic(status_file(), out)
    except OSError as exc:
        raise HostError(f"cannot write {status_file()}: {exc.strerror or exc}") from exc
    return out
