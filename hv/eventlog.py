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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["EventLog", "read_events"]


class EventLog:
    """Appends events to a file (flushed per line, so a killed hv loses nothing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; returns it as written."""
        record: dict[str, Any] = {"ts": round(time.time(), 3), "event": event, **fields}
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

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
