"""Peers that are not QEMU, for the tests of what hv does when a socket lies.

Not a test module.  A :class:`FakeQMP` greets like QMP and answers each command from a
table, so a test can hand hv a malformed answer at one precise place; ``garbage``
sends bytes that are not QMP at all.  These only test hv's checks of what it is told:
every feature that talks to QEMU is tested against real QEMU elsewhere.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": ["oob"]}}

# What a small healthy QEMU answers to hv's attach, command by command.
HEALTHY: dict[str, Any] = {
    "qmp_capabilities": {},
    "query-kvm": {"enabled": False, "present": True},
    "query-memory-size-summary": {"base-memory": 268435456, "plugged-memory": 0},
    "human-monitor-command": "",
    "qom-list": [],
    "query-status": {"status": "running", "running": True},
}


class FakeQMP:
    """A unix-socket server answering QMP commands from ``answers`` (command → value).

    A value of ``bytes`` is sent raw instead of as a ``return``.  Commands missing
    from the table get a QMP error, as QEMU gives for an unknown command.
    """

    def __init__(self, path: Path, answers: dict[str, Any] | None = None,
                 greeting: bytes | None = None) -> None:
        self.path = path
        self.answers = {**HEALTHY, **(answers or {})}
        self.greeting = greeting if greeting is not None else json.dumps(GREETING).encode() + b"\n"
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.greeting)
                # QMP is a stream of JSON objects, not lines: clients need not end them.
                decoder, buf = json.JSONDecoder(), ""
                while chunk := conn.recv(65536):
                    buf += chunk.decode()
                    while buf.strip():
                        msg, end = decoder.raw_decode(buf.lstrip())
                        buf = buf.lstrip()[end:]
                        conn.sendall(self._answer(msg))
            except (OSError, ValueError):
                return

    def _answer(self, msg: dict[str, Any]) -> bytes:
        command = msg.get("execute")
        if command == "human-monitor-command":
            key = f"hmp:{msg['arguments']['command-line']}"
            command = key if key in self.answers else command
        value = self.answers.get(command, KeyError)
        if isinstance(value, bytes):
            return value
        reply: dict[str, Any]
        if value is KeyError:
            reply = {"error": {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}}
        else:
            reply = {"return": value}
        if "id" in msg:
            reply["id"] = msg["id"]
        return json.dumps(reply).encode() + b"\n"

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "FakeQMP":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
