"""hv as a systemd service: sd_notify on a real NOTIFY_SOCKET, the unit file, other tuners.

The test binds the notification socket itself (an abstract one, as systemd's own is
not), runs a real ``hv run`` managing a real guest with ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC`` set as systemd sets them, and reads what hv sends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, Guests, hv_cli, kill_pid, wait_for
from tests.functional.hvrun import HvRun, write_config

UNIT = REPO / "contrib" / "hv.service"
WATCHDOG_USEC = 3_000_000  # hv pings every 1.5 s, above its 1 s poll


class NotifySocket:
    """A bound datagram socket, as systemd's; collects the notifications sent to it."""

    def __init__(self, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name.encode())
        self.env = "@" + name
        self.received: list[dict[str, str]] = []

    def next(self, key: str, timeout_s: float, run: HvRun | None = None) -> dict[str, str]:
        """The next datagram holding ``key=...`` (each datagram is KEY=VALUE lines);
        fails at once if ``run`` has exited."""
        deadline = time.monotonic() + timeout_s
        while True:
            if run is not None:
                run.check_alive()
            left = min(1.0, deadline - time.monotonic())
            if left <= 0:
                raise AssertionError(f"no {key}= within {timeout_s:.0f} s; got {self.received}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append(msg)
            if key in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_watchdog_reload_stop(guests: Guests, state_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    g = guests.launch("svc", mem="256M")
    guests.wait_event(g, "ready", 90)
    config = write_config(tmp_path / "hv.toml", {"managed": "4G", "share_interval_s": 0},
                          {"svc": {"min": "256M", "max": "256M"}})
    notify = NotifySocket(f"hv-test-notify-{os.getpid()}")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.env)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    run = HvRun(config, tmp_path / "events.jsonl")
    try:
        ready = notify.next("READY", 60, run)
        # READY=1 comes after the first complete tick: the VM was read and logged.
        ticks = run.ticks("svc")
        assert ticks and ticks[0]["tick"] == 0, run.stderr()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(run.proc.pid)
        assert ready["STATUS"].endswith(": 1 VMs managed")
        assert run.events("ready")[0]["systemd"] is True
        # WATCHDOG=1 keeps coming, at about half of WatchdogSec.
        first = notify.next("WATCHDOG", 10)
        t0 = time.monotonic()
        second = notify.next("WATCHDOG", 10)
        assert first["WATCHDOG"] == second["WATCHDOG"] == "1"
        assert time.monotonic() - t0 >= WATCHDOG_USEC / 2e6 * 0.5
        # ExecReload's SIGHUP: RELOADING=1, the reload, READY=1 again.
        run.proc.send_signal(signal.SIGHUP)
        assert notify.next("RELOADING", 10)["RELOADING"] == "1"
        assert notify.next("READY", 30)["READY"] == "1"
        run.wait_event("reload", 10)
        assert "cannot notify" not in run.stderr()
        assert run.stop() == 0
        assert notify.next("STOPPING", 5)["STOPPING"] == "1"
    finally:
        run.close()
        notify.close()


def test_notify_to_a_socket_path_and_outside_systemd(tmp_path: Path) -> None:
    """The same protocol to a socket given by path; no NOTIFY_SOCKET: nothing is sent."""
    from hv.host.notify import Notifier

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
        assert n.ready("ok") and n.watchdog()
        assert s.recv(4096).decode().splitlines()[:2] == ["READY=1", "STATUS=ok"]
        assert s.recv(4096) == b"WATCHDOG=1"
        assert not n.watchdog()  # paced: not again within half the timeout
    warnings: list[str] = []
    gone = Notifier({"NOTIFY_SOCKET": str(path)}, warn=warnings.append)  # unbound now
    assert not gone.ready("x") and not gone.ready("x")
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0]
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready("x") and not quiet.watchdog()
    # A watchdog meant for another process is not ours to ping.
    assert Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000",
                     "WATCHDOG_PID": "1"}).watchdog_s is None


def test_unit_file_verifies() -> None:
    """``systemd-analyze verify`` accepts the unit without a warning (systemd is part of
    Debian 12; the test runs it for real).  ExecStart points at the installed ``hv``; here
    at this checkout's."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (Debian's systemd package)"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/hv run " in text
    hv_bin = Path(sys.executable).with_name("hv")
    assert hv_bin.exists()

    def verify(unit_text: str, where: Path) -> subprocess.CompletedProcess[str]:
        where.mkdir()
        (where / "hv.service").write_text(unit_text.replace("/usr/local/bin/hv", str(hv_bin)))
        return subprocess.run([analyze, "verify", str(where / "hv.service")],
                              capture_output=True, text=True, timeout=60, cwd=where)

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        done = verify(text, Path(d) / "ok")
        assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
        for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure",
                    "ExecReload=/bin/kill -HUP $MAINPID"):
            assert key in text
        # verify does complain (on stderr) about a unit it cannot use.
        bad = verify(text.replace("Type=notify", "Type=notifyy"), Path(d) / "bad")
        assert "notifyy" in bad.stderr


@pytest.mark.parametrize("tuner", ["ksmtuned", "momd"])
def test_refuses_beside_another_tuner(tmp_path: Path, state_dir: Path, run_dir: Path,
                                      tuner: str) -> None:
    """A running ksmtuned (a shell script, so named by the kernel) or momd (a Python
    script under its interpreter): `hv run` refuses in one line naming it, before it
    attaches anything; --allow-other-tuners only warns."""
    script = tmp_path / tuner
    if tuner == "ksmtuned":
        script.write_text("#!/bin/sh\nwhile :; do sleep 1; done\n")
        script.chmod(0o755)
        cmd = [str(script)]
    else:
        script.write_text("import time\nwhile True:\n    time.sleep(1)\n")
        cmd = [sys.executable, str(script), "-c", "/etc/vdsm/mom.conf"]
    other = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        from hv.host.tuners import running_tuners
        wait_for(lambda: any(t.pid == other.pid for t in running_tuners()), 10,
                 f"{tuner} to be seen")
        dead = tmp_path / "dead.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(dead))
        s.close()
        config = write_config(tmp_path / "hv.toml", {"managed": "1G", "share_interval_s": 0},
                              {"g": {"socket": str(dead), "min": "128M"}})
        done = hv_cli("run", "--config", str(config))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert f"{tuner} (pid {other.pid}," in lines[0] and "--allow-other-tuners" in lines[0]
        assert not (state_dir / "daemon" / "guard.json").exists()
        run = HvRun(config, tmp_path / "events.jsonl", "--allow-other-tuners")
        try:
            warning = (f"warning: other memory tuners run (--allow-other-tuners): {tuner} "
                       f"(pid {other.pid},")
            wait_for(lambda: warning in run.stderr(), 30, "the warning")
            run.wait_event("start", 30)  # it went on (to wait for the VM not running)
            assert run.stop() == 0
        finally:
            run.close()
    finally:
        kill_pid(other.pid)
        other.wait(5)
