"""``hv top``: a live terminal view of the running ``hv run``.

It reads the snapshot the daemon writes every tick (:mod:`hv.daemon.status`), never
QMP, so it works while ``hv run`` holds every VM's QMP socket.  :func:`frame` is the
pure part (snapshot to text); :func:`run` is the curses loop around it: a frame every
second, ``s``/``S`` sort by the next/previous column, ``r`` reverses, ``q`` quits.
"""

from __future__ import annotations

import curses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hv.units import format_size, table

__all__ = ["COLUMNS", "Sort", "frame", "run"]

REFRESH_S = 1.0

# How long a key waits before the loop looks at the clock again: keys feel immediate,
# and an idle top wakes 10 times a second only.
KEY_POLL_MS = 100


def _size(v: float | None) -> str | None:
    return None if v is None else format_size(v)


def _active(row: dict[str, Any]) -> float | None:
    value = (row.get("active") or {}).get("used")
    return None if value is None else float(value)


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.0f}%"


def _shared(row: dict[str, Any]) -> int | None:
    value = (row.get("sharing") or {}).get("merging_pages")
    return None if value is None else int(value)


@dataclass(frozen=True)
class Column:
    """One column: its title, its sort value and its text."""

    title: str
    value: Callable[[dict[str, Any]], Any]
    text: Callable[[dict[str, Any]], object]


COLUMNS: dict[str, Column] = {
    "vm": Column("VM", lambda r: r["name"], lambda r: r["name"]),
    "target": Column("TARGET", lambda r: r.get("target_bytes"),
                     lambda r: _size(r.get("target_bytes"))),
    "balloon": Column("BALLOON", lambda r: r.get("balloon_bytes"),
                      lambda r: _size(r.get("balloon_bytes"))),
    "resident": Column("RESIDENT", lambda r: r.get("host_resident_bytes"),
                       lambda r: _size(r.get("host_resident_bytes"))),
    "swapped": Column("SWAPPED", lambda r: r.get("host_swap_bytes"),
                      lambda r: _size(r.get("host_swap_bytes"))),
    "active": Column("ACTIVE", _active, lambda r: _percent(_active(r))),
    "shares": Column("SHARES", lambda r: r.get("shares"), lambda r: r.get("shares")),
    "shared": Column("SHARED-PAGES", _shared, _shared),
}


@dataclass(frozen=True)
class Sort:
    """Which column the rows are sorted by; sizes and counts largest first."""

    key: str = "resident"
    reverse: bool = False

    def step(self, by: int) -> "Sort":
        keys = list(COLUMNS)
        return Sort(keys[(keys.index(self.key) + by) % len(keys)], self.reverse)

    def flipped(self) -> "Sort":
        return Sort(self.key, not self.reverse)

    def order(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        col = COLUMNS[self.key]
        descending = self.key != "vm"  # names A to Z, numbers largest first
        present = [r for r in rows if col.value(r) is not None]
        missing = [r for r in rows if col.value(r) is None]
        present.sort(key=lambda r: (col.value(r), r["name"]), reverse=descending != self.reverse)
        return present + missing  # rows not read yet stay last either way


def _header(snap: dict[str, Any]) -> list[str]:
    ksm = snap.get("ksm")
    if ksm is None:
        sharing = "KSM off (sharing not run by hv)"
    else:
        share = ksm.get("ksmd_cpu_fraction")
        sharing = (f"KSM {ksm.get('mode') or '-'}  ksmd CPU "
                   f"{'-' if share is None else f'{100 * share:.1f}%'}")
    as_of = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    return [f"hv run pid {snap['pid']}  tick {snap.get('tick', '-')}  as of {as_of}",
            f"state {snap['state'].upper()}  free {format_size(snap['free_bytes'])}  "
            f"pool {format_size(snap['pool_bytes'])}  {sharing}"]


def frame(snap: dict[str, Any] | None, sort: Sort) -> str:
    """One frame: the host header, then one row per VM in ``sort`` order."""
    if snap is None:
        return "hv top: no hv run is running (waiting for one)"
    rows = sort.order([{"name": n, **r} for n, r in snap["vms"].items()])
    header = [c.title + ("*" if k == sort.key else "") for k, c in COLUMNS.items()]
    body = table([[c.text(r) for c in COLUMNS.values()] for r in rows], header)
    direction = "ascending" if (sort.key == "vm") != sort.reverse else "descending"
    return "\n".join([*_header(snap), "", body, "",
                      f"sorted by {sort.key} ({direction})  s/S: next/previous column  "
                      "r: reverse  q: quit"])


def run(read: Callable[[], dict[str, Any] | None], sort: Sort,
        refresh_s: float = REFRESH_S) -> None:
    """The live view until ``q`` (or Ctrl-C)."""
    curses.wrapper(_loop, read, sort, refresh_s)


def _draw(scr: "curses.window", text: str) -> None:
    height, width = scr.getmaxyx()
    scr.erase()
    for y, line in enumerate(text.splitlines()[:height]):
        scr.addnstr(y, 0, line, max(0, width - 1))
    scr.refresh()


def _loop(scr: "curses.window", read: Callable[[], dict[str, Any] | None], sort: Sort,
          refresh_s: float) -> None:
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal without an invisible cursor
    scr.timeout(KEY_POLL_MS)
    snap, due = read(), 0.0
    while True:
        now = time.monotonic()
        if now >= due:
            snap, due = read(), now + refresh_s
            _draw(scr, frame(snap, sort))
        key = scr.getch()
        if key in (ord("q"), ord("Q")):
            return
        changed = {ord("s"): lambda: sort.step(1), ord("S"): lambda: sort.step(-1),
                   ord("r"): sort.flipped}.get(key)
        if changed is not None:
            sort = changed()
            _draw(scr, frame(snap, sort))
