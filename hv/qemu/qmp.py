"""The QMP session: one seam for every command hv sends to QEMU.

Built on ``qemu.qmp`` (the QEMU project's own library).  This layer adds what hv
needs on top: the QEMU pid of the peer (``SO_PEERCRED`` on the unix socket, so it
works for VMs hv did not start), timeouts, mapping of library errors onto
:mod:`hv.errors`, and a transcript of every command for tests and logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, Runstate
from qemu.qmp import QMPError as LibQMPError

from hv.errors import QMPBusy, QMPError, VMError, VMGone, VMNotFound

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # a live QEMU answers its greeting in milliseconds
COMMAND_TIMEOUT_S = 30.0  # HMP commands on a TCG guest can take a while; nothing we send takes longer


@dataclass
class Transcript:
    """What hv sent over QMP, in order: (command, arguments)."""

    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process on the other end of a connected unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


def path_kind(path: Path) -> str | None:
    """What ``path`` is, in words for an error message: ``socket`` when it is one, None
    when there is nothing there."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


class QMPSession:
    """An open QMP connection to one VM.

    Use as an async context manager, or call :meth:`open` and :meth:`close`.
    """

    def __init__(self, name: str, socket_path: str | os.PathLike[str],
                 transcript: Transcript | None = None) -> None:
        self.name = name
        self.socket_path = Path(socket_path)
        self.transcript = transcript
        self.pid: int | None = None
        self._client = QMPClient(name)
        self._closing = False

    async def open(self) -> "QMPSession":
        """Connect, negotiate capabilities and learn the peer pid."""
        kind = path_kind(self.socket_path)
        if kind is None:
            raise VMNotFound(self.name, f"no such QMP socket: {self.socket_path}")
        if kind != "socket":
            raise VMError(self.name, f"{self.socket_path} is {kind}, not a QMP socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(str(self.socket_path))
            sock.setblocking(False)
            self.pid = peer_pid(sock)
        except BlockingIOError as exc:
            # EAGAIN: the listen backlog is full. QEMU accepts one QMP client at a
            # time; the others wait in the backlog until it lets go.
            sock.close()
            raise QMPBusy(self.name, f"QMP at {self.socket_path} is busy (another client "
                          "holds it and others are queued)") from exc
        except ConnectionRefusedError as exc:
            sock.close()
            raise VMGone(self.name, f"QMP socket {self.socket_path} refuses connections "
                         "(QEMU is not running)") from exc
        except OSError as exc:
            sock.close()
            raise QMPError(self.name, f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from exc
        try:
            await asyncio.wait_for(self._client.connect(sock), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError as exc:
            sock.close()
            raise QMPBusy(self.name, f"QMP at {self.socket_path} did not greet within "
                          f"{CONNECT_TIMEOUT_S:.0f} s (another client holds it)") from exc
        except (ConnectError, LibQMPError, OSError, EOFError) as exc:
            sock.close()
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QMPError(self.name, f"{self.socket_path} does not speak QMP (handshake failed: "
                           f"{why})") from exc
        return self

    async def close(self) -> None:
        """Disconnect; never raises (the peer may be gone already)."""
        if self._client.runstate == Runstate.IDLE:
            return
        try:
            await asyncio.wait_for(self._client.disconnect(), CONNECT_TIMEOUT_S)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - teardown must not raise
            log.debug("%s: QMP disconnect: %r", self.name, exc)

    async def __aenter__(self) -> "QMPSession":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float = COMMAND_TIMEOUT_S) -> Any:
        """Run one QMP command and return its ``return`` value."""
        args = arguments or {}
        if self.transcript is not None:
            self.transcript.commands.append((command, args))
        if not self.connected:
            raise VMGone(self.name, f"QEMU went away (QMP connection lost before {command!r})")
        try:
            return await asyncio.wait_for(self._client.execute(command, args or None), timeout_s)
        except ExecuteError as exc:
            raise QMPError(self.name, f"{command}: {exc.error.error.desc}") from exc
        except asyncio.TimeoutError as exc:
            raise QMPError(self.name, f"{command}: no answer within {timeout_s:.0f} s") from exc
        except (ExecInterruptedError, EOFError, ConnectionError) as exc:
            raise VMGone(self.name, f"QEMU went away during {command!r}") from exc
        except LibQMPError as exc:
            if not self.connected:
                raise VMGone(self.name, f"QEMU went away during {command!r}") from exc
            raise QMPError(self.name, f"{command}: {exc}") from exc
