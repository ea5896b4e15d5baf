"""hv's event log: one JSON object per line, append-only.

Every line has ``ts`` (Unix time, seconds) and ``event`` (what happened); the rest
depends on the event.  The daemon writes, per VM per tick, an ``event: "tick"``
line with the target, balloon, resident and swapped bytes, the active estimates
and the state; and one line per action (``balloon``, ``swap``, ``pause``,
``resume``, ``ksm_raised``, ``ksm_restored``, ``sample``...).  Readers
(:func:`read_events`) skip a torn last line, so the log can be read while written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["EventLog", "read_events"]


class EventLog:
    """Appends events to a file, one ``write`` per line (so a killed hv loses nothing).

    A line that cannot be written (a full disk) is counted, not raised: the daemon goes
    on managing its VMs.  ``on_error`` hears of the first failure of a run of them; the
    first line written afterwards is a ``log_gap`` event with how many were ``lost``,
    after a newline that ends any line the full disk cut short.
    """

    def __init__(self, path: str | Path, on_error: Callable[[OSError], None] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                       | os.O_CLOEXEC, 0o644)
        self.on_error = on_error
        self.lost = 0  # events not written since the last line that was

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; returns it as written (or as it would have been)."""
        record: dict[str, Any] = {"ts": round(time.time(), 3), "event": event, **fields}
        if self._fd is None:
            return record
        text = json.dumps(record, separators=(",", ":")) + "\n"
        if self.lost:
            gap = {"ts": record["ts"], "event": "log_gap", "lost": self.lost}
            text = "\n" + json.dumps(gap, separators=(",", ":")) + "\n" + text
        data = text.encode()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            if not self.lost and self.on_error is not None:
                self.on_error(exc)
            self.lost += 1
        else:
            self.lost = 0
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | Path, event: str | None = None) -> Iterator[dict[str, Any]]:
    """The events of a log (only those named ``event`` if given), oldest first."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if isinstance(record, dict) and (event is None or record.get("event") == event):
            yield record
