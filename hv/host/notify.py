"""systemd's service notification protocol (``sd_notify(3)``), with the standard library.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a unix datagram socket, a
path or an abstract name (written with a leading ``@``).  A service sends newline
separated ``KEY=VALUE`` lines to it: ``READY=1`` once it serves, ``RELOADING=1`` /
``READY=1`` around a reload, ``STOPPING=1``, ``STATUS=...``, and ``WATCHDOG=1`` at
least every ``$WATCHDOG_USEC`` microseconds when ``WatchdogSec=`` is set (systemd
kills and, with ``Restart=on-failure``, restarts a service that misses it).
``$WATCHDOG_PID``, when set, names the one process the watchdog is meant for.

Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.  A notification
that cannot be delivered is not an error of hv's: it is reported once through the
``warn`` callback and dropped.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

__all__ = ["Notifier"]

MIN_WATCHDOG_PERIOD_S = 0.05  # systemd's WatchdogSec is whole milliseconds at the least


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` and keeps the watchdog's pace."""

    def __init__(self, environ: dict[str, str] | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        # An abstract socket's name starts with a NUL byte, which no environment holds.
        self.address: str | bytes | None = (
            b"\0" + raw[1:].encode() if raw.startswith("@") else raw) or None
        self.watchdog_s = self._watchdog_s(env)
        self._warn = warn or (lambda line: None)
        self._warned = False
        self._last_watchdog = float("-inf")

    @staticmethod
    def _watchdog_s(env: dict[str, str] | os._Environ[str]) -> float | None:
        """Half the watchdog timeout (as ``sd_watchdog_enabled`` advises), or None."""
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        pid = env.get("WATCHDOG_PID")
        if usec <= 0 or (pid and pid != str(os.getpid())):
            return None
        return max(MIN_WATCHDOG_PERIOD_S, usec / 2e6)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was delivered."""
        if self.address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto("\n".join(lines).encode(), self.address)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    self._warn(f"cannot notify systemd at {os.environ.get('NOTIFY_SOCKET')}: "
                               f"{exc.strerror or exc}")
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 match the reload to its end (sd_notify(3)).
        return self.send("RELOADING=1",
                         f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1`` if the watchdog is on and half its timeout has passed."""
        if self.watchdog_s is None:
            return False
        now = time.monotonic()
        if now - self._last_watchdog < self.watchdog_s:
            return False
        self._last_watchdog = now
        return self.send("WATCHDOG=1")
