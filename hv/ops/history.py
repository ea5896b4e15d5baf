"""The dashboard's memory: the last hour of snapshots, thinned and bounded.

``hv run`` publishes a snapshot every tick (a second or so); the dashboard needs a
point every few seconds for an hour.  :class:`History` keeps one compact point per
:data:`STEP_S` and at most :data:`SPAN_S` of them, so its size is fixed whatever the
uptime: 1800 points of a few hundred bytes per VM.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

__all__ = ["STEP_S", "SPAN_S", "History", "point"]

# One point per 2 s: finer than a chart an hour wide can show (a pixel is ~4 s at
# 900 px), coarse enough to keep the whole hour in 1800 points.
STEP_S = 2.0

# What the dashboard shows: the last hour.
SPAN_S = 3600.0

# Per-VM values of a point, in this order (bytes; None when not read yet).
VM_FIELDS = ("target", "balloon", "resident", "swapped", "active", "potential", "realized")


def _active_bytes(row: dict[str, Any]) -> int | None:
    """The VM's active memory: the fraction the policy uses times what it holds."""
    used = (row.get("active") or {}).get("used")
    held = row.get("host_resident_bytes")
    if used is None or held is None:
        return None
    return int(used * min(held, row["max_bytes"]))


def point(snapshot: dict[str, Any], page_size: int) -> dict[str, Any]:
    """The compact point of one snapshot: time, host state and memory, per-VM values."""
    ksm = snapshot.get("ksm") or {}

    def pages(value: float | None) -> int | None:
        return None if value is None else int(value * page_size)

    vms = {}
    for name, row in snapshot["vms"].items():
        share = row.get("sharing") or {}
        vms[name] = [row.get("target_bytes"), row.get("balloon_bytes"),
                     row.get("host_resident_bytes"), row.get("host_swap_bytes"),
                     _active_bytes(row), pages(share.get("potential_pages")),
                     pages(share.get("realized_pages"))]
    return {"t": snapshot["time"], "state": snapshot["state"], "free": snapshot["free_bytes"],
            "pool": snapshot["pool_bytes"], "potential": pages(ksm.get("potential_pages")),
            "realized": pages(ksm.get("realized_pages")), "vms": vms}


class History:
    """Points of the last :data:`SPAN_S`, one per :data:`STEP_S`; safe across threads
    (the daemon adds, the HTTP server reads)."""

    def __init__(self, page_size: int, step_s: float = STEP_S, span_s: float = SPAN_S) -> None:
        self.page_size = page_size
        self.step_s = step_s
        self.span_s = span_s
        self._points: deque[dict[str, Any]] = deque(maxlen=max(1, int(span_s / step_s)))
        self._lock = threading.Lock()

    def add(self, snapshot: dict[str, Any]) -> bool:
        """Keep the snapshot's point if a step has passed since the last kept one."""
        p = point(snapshot, self.page_size)
        with self._lock:
            if self._points and p["t"] - self._points[-1]["t"] < self.step_s:
                return False
            self._points.append(p)
            while self._points and p["t"] - self._points[0]["t"] > self.span_s:
                self._points.popleft()
            return True

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            points = list(self._points)
        return {"step_s": self.step_s, "span_s": self.span_s, "vm_fields": list(VM_FIELDS),
                "points": points}

    def __len__(self) -> int:
        with self._lock:
            return len(self._points)
