"""The HTTP server of ``hv run --metrics ADDR:PORT``.

One server, in a thread of the daemon's process, fed the snapshot every tick
(:meth:`OpsServer.update`, an ``on_publish`` hook of the daemon):

- ``/metrics``      Prometheus text format (:class:`~hv.ops.metrics.SnapshotCollector`)
- ``/``             the dashboard (HTML, JS and CSS shipped in ``hv/ops/static``; no CDN)
- ``/api/status``   the last snapshot, as JSON (without host addresses of guest RAM)
- ``/api/history``  the last hour, thinned (:class:`~hv.ops.history.History`)

Only GET; everything else is 404 or 405.  The default address is the loopback: the
snapshot names VMs, sockets and pids, which a remote reader should be given on purpose.
"""

from __future__ import annotations

import json
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from hv.errors import HostError, UsageError
from hv.ops.history import History
from hv.ops.metrics import SnapshotCollector
from hv.units import PAGE_SIZE

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_PORT", "parse_listen", "OpsServer"]

DEFAULT_ADDRESS = "127.0.0.1"

# Outside Prometheus's exporter range 9100-9999 (fully allocated, 9100 and 9177 among
# the busiest), below Linux's ephemeral ports (32768-), and in no /etc/services entry.
DEFAULT_PORT = 7479

# The dashboard's files, and their types: nothing else is served from the package.
STATIC = {"index.html": "text/html; charset=utf-8",
          "dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``:PORT``, ``PORT`` or ``ADDR`` (``[v6]:PORT`` too) to (addr, port)."""
    addr, port_text = DEFAULT_ADDRESS, str(DEFAULT_PORT)
    t = text.strip()
    if not t:
        return addr, int(port_text)
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"--metrics {text!r}: use ADDR:PORT, [IPv6]:PORT or PORT")
        addr, port_text = host, rest[1:] or port_text
    elif t.isdigit():
        port_text = t
    elif t.count(":") == 1:
        host, _, port_text = t.partition(":")
        addr = host or addr
    elif t and ":" not in t:
        addr = t
    else:
        raise UsageError(f"--metrics {text!r}: use ADDR:PORT, [IPv6]:PORT or PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--metrics {text!r}: the port must be 1-65535")
    return addr, int(port_text)


def _public(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    """The snapshot without where guest RAM lives in QEMU (host addresses are for local
    readers of the status file, not for the network)."""
    if snapshot is None:
        return None
    vms = {name: {k: v for k, v in row.items() if k != "ram"}
           for name, row in snapshot["vms"].items()}
    return {**snapshot, "vms": vms}


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        ops = self.server.ops
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(ops.registry))
        elif path == "/api/status":
            self._json({"snapshot": _public(ops.snapshot), "page_size": PAGE_SIZE})
        elif path == "/api/history":
            self._json(ops.history.as_dict())
        elif path in ("/", "/index.html") or path.removeprefix("/static/") in STATIC:
            name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
            body = resources.files("hv.ops").joinpath("static", name).read_bytes()
            self._send(HTTPStatus.OK, STATIC[name], body)
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

    def _json(self, value: Any) -> None:
        self._send(HTTPStatus.OK, "application/json", json.dumps(value).encode())

    def _send(self, status: HTTPStatus, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # a scrape every 15 s is not news; errors reach the client


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ops: "OpsServer"


class _Server6(_Server):
    address_family = socket.AF_INET6


class OpsServer:
    """Serves the last snapshot and the history; bind with :meth:`start`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT,
                 history: History | None = None) -> None:
        self.address, self.port = address, port
        self.history = history or History(PAGE_SIZE)
        self.snapshot: dict[str, Any] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(lambda: self.snapshot))
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/"

    def update(self, snapshot: dict[str, Any]) -> None:
        """The daemon's hook: the new snapshot, for the next request and the history."""
        self.snapshot = snapshot
        self.history.add(snapshot)

    def start(self) -> None:
        """Bind and serve in a thread; HostError if the address cannot be bound."""
        cls = _Server6 if ":" in self.address else _Server
        try:
            self._httpd = cls((self.address, self.port), _Handler)
        except OSError as exc:
            raise HostError(f"--metrics: cannot listen on {self.address}:{self.port}: "
                            f"{exc.strerror or exc}") from exc
        self._httpd.ops = self
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="hv-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
