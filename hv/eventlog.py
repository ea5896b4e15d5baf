"""hv's event log: one JSON object per line, append-only, rotated by size.

Every line has ``ts`` (Unix time, seconds) and ``event`` (what happened); the rest
depends on the event.  The daemon writes, per VM per tick, an ``event: "tick"``
line with the target, balloon, resident and swapped bytes, the active estimates
and the state; and one line per action (``balloon``, ``swap``, ``pause``,
``resume``, ``ksm_raised``, ``ksm_restored``, ``sample``...).  Readers
(:func:`read_events`) skip a torn last line, so the log can be read while written.

**Rotation.**  Once the file would grow past ``max_bytes``, it is renamed
``events.jsonl.1`` (``.1`` to ``.2`` and so on first; the oldest past ``keep`` is
deleted) and a new one is started, as logrotate would, but without a window where a
line is lost.  :func:`read_events` reads the rotated files too, oldest first, so a
reader sees one continuous log.  The files are 0600: they name VMs, sockets and
memory figures of every guest.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hv import paths
from hv.errors import UsageError
from hv.units import MiB, format_size

__all__ = ["EventLog", "read_events", "log_files", "DEFAULT_MAX_BYTES", "DEFAULT_KEEP"]

# A tick line is ~600 bytes; ten VMs on a busy host (every VM read every second) write
# ~500 MiB a day, an idle host (each VM every 10 s) ~50 MiB: 64 MiB is hours to a day
# of history per file, quick to grep.
DEFAULT_MAX_BYTES = 64 * MiB

# Rotated files kept besides the current one: with the default size, at most 320 MiB.
DEFAULT_KEEP = 4

# A log smaller than this would rotate on every few lines.
MIN_MAX_BYTES = 64 * 1024


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def log_files(path: str | Path) -> list[Path]:
    """The log's files, oldest first: ``path.N`` ... ``path.1``, then ``path``."""
    path = Path(path)
    older = []
    n = 1
    while rotated(path, n).exists():
        older.append(rotated(path, n))
        n += 1
    return [*reversed(older), path]


class EventLog:
    """Appends events to a file, one ``write`` per line (so a killed hv loses nothing);
    rotates it past ``max_bytes`` keeping ``keep`` older files (``keep`` 0: none).

    A line that cannot be written (a full disk) is counted, not raised: the daemon goes
    on managing its VMs.  ``on_error`` hears of the first failure of a run of them; the
    first line written afterwards is a ``log_gap`` event with how many were ``lost``,
    after a newline that ends any line the full disk cut short.
    """

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP,
                 on_error: Callable[[OSError], None] | None = None) -> None:
        self.check_limits(max_bytes, keep)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.on_error = on_error
        self.lost = 0  # events not written since the last line that was
        self._fd: int | None = None
        self._closed = False
        self._size = 0
        self._open()

    @staticmethod
    def check_limits(max_bytes: int, keep: int) -> None:
        """UsageError for a rotation size or a count of files that cannot work."""
        if max_bytes < MIN_MAX_BYTES:
            raise UsageError(f"event log size {format_size(max_bytes)} is below the minimum "
                             f"{format_size(MIN_MAX_BYTES)} (it would rotate every few lines)")
        if keep < 0:
            raise UsageError(f"event log files to keep must be 0 or more, not {keep}")

    def _open(self) -> None:
        self._fd = paths.open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None  # reopened by the next write if the rename or open fails
        for n in range(self.keep, 0, -1):
            older = rotated(self.path, n)
            if older.exists():
                if n == self.keep:
                    older.unlink()
                else:
                    older.rename(rotated(self.path, n + 1))
        if self.keep:
            self.path.rename(rotated(self.path, 1))
        else:
            self.path.unlink(missing_ok=True)
        self._open()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; returns it as written (or as it would have been)."""
        record: dict[str, Any] = {"ts": round(time.time(), 3), "event": event, **fields}
        if self._closed:
            return record
        text = json.dumps(record, separators=(",", ":")) + "\n"
        if self.lost:
            gap = {"ts": record["ts"], "event": "log_gap", "lost": self.lost}
            text = "\n" + json.dumps(gap, separators=(",", ":")) + "\n" + text
        data = text.encode()
        try:
            if self._fd is None:
                self._open()
            elif self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            assert self._fd is not None
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
                self._size += n
        except OSError as exc:
            if not self.lost and self.on_error is not None:
                self.on_error(exc)
            self.lost += 1
        else:
            self.lost = 0
        return record

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | Path, event: str | None = None) -> Iterator[dict[str, Any]]:
    """The events of a log and its rotated files (only those named ``event`` if given),
    oldest first."""
    for file in log_files(path):
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue  # rotated away meanwhile, or not written yet
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if isinstance(record, dict) and (event is None or record.get("event") == event):
                yield record
