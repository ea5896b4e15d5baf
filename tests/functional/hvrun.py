"""Helpers for the daemon, sampler and swap tests: host swap, KSM snapshots, `hv run`.

Not a test module: imported by test_daemon*.py and test_sampler*.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hv.eventlog import read_events
from hv.host import swap
from hv.units import MiB
from tests.conftest import REPO, hv_cli, kill_pid, wait_for

KSM_TUNABLES = ("run", "pages_to_scan", "sleep_millisecs")

# Enough for the tests' admission (sum of max - min of two 256 MiB guests with
# min 96-128 MiB) plus what sampling and forced hard states page out.
TEST_SWAP_BYTES = 1024 * MiB


def ksm_snapshot() -> dict[str, str]:
    out = {}
    for name in KSM_TUNABLES:
        with open(f"/sys/kernel/mm/ksm/{name}") as f:
            out[name] = f.read().strip()
    return out


def assert_ksm_restored(log: Path, state_dir: Path, before: dict[str, str]) -> None:
    """hv put KSM's tunables back: every raise has its restore, the record is gone, and
    the tunables are what they were before the test (nothing else runs KSM in tests)."""
    raised = list(read_events(log, "ksm_raised"))
    restored = list(read_events(log, "ksm_restored"))
    assert len(restored) >= len(raised), (raised, restored)
    assert not (state_dir / "ksm-saved.json").exists()
    for r, s in zip(raised, restored):
        assert {k: r["saved"][k] for k in KSM_TUNABLES} == before
        assert {k: s["now"][k] for k in KSM_TUNABLES} == before
    assert ksm_snapshot() == before


def swap_fixture(tmp_path_factory: pytest.TempPathFactory | None = None,
                 size_bytes: int = TEST_SWAP_BYTES, enough_bytes: int | None = None) -> Iterator[None]:
    """Make sure the host has ``enough_bytes`` of free swap (default 3/4 of ``size_bytes``),
    creating ``size_bytes`` more if not; remove what this created afterwards."""
    _, free = swap.totals()
    if free >= (size_bytes * 3 // 4 if enough_bytes is None else enough_bytes):
        yield
        return
    # /var/tmp, not /tmp: swapon refuses files on tmpfs, which /tmp often is.
    d = Path(tempfile.mkdtemp(prefix="hv-test-swap-", dir="/var/tmp"))
    env = {"HV_STATE_DIR": str(d / "state")}
    path = d / "swapfile"
    done = hv_cli("swap", "create", str(size_bytes), "--path", str(path), env=env)
    assert done.returncode == 0, done.stderr
    try:
        yield
    finally:
        done = hv_cli("swap", "remove", "--path", str(path), env=env, timeout_s=300)
        assert done.returncode == 0, done.stderr
        assert not path.exists()
        shutil.rmtree(d, ignore_errors=True)


def write_config(path: Path, host: dict[str, Any], vms: dict[str, dict[str, Any]]) -> Path:
    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    lines = ["[host]"] + [f"{k} = {value(v)}" for k, v in host.items()]
    for name, table in vms.items():
        lines += ["", f"[vm.{name}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class HvRun:
    """One `hv run` process and its event log."""

    def __init__(self, config: Path, log: Path, *extra: str, stderr_dir: Path | None = None) -> None:
        self.log = log
        self.stderr_path = (stderr_dir / log.name if stderr_dir else log).with_suffix(
            f".{int(time.time() * 1000)}.stderr")
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hv.cli", "run", "--config", str(config), "--log", str(log),
             *extra],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._stderr, env=dict(os.environ))

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        return [e for e in read_events(self.log, event)
                if all(e.get(k) == v for k, v in match.items())]

    def ticks(self, vm: str) -> list[dict[str, Any]]:
        """The VM's tick lines so far."""
        return self.events("tick", vm=vm)

    def last_tick(self, vm: str) -> dict[str, Any]:
        got = self.ticks(vm)
        assert got, f"no tick for {vm}"
        return got[-1]

    def wait_event(self, event: str, timeout_s: float, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            self.check_alive()
            got = self.events(event, **match)
            return got[-1] if got else None
        return wait_for(found, timeout_s, f"event {event} {match}")  # type: ignore[no-any-return]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"hv run exited with {self.proc.returncode}: {self.stderr()}")

    def stderr(self) -> str:
        if not self._stderr.closed:  # also readable once stopped
            self._stderr.flush()
        return self.stderr_path.read_text()

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            kill_pid(self.proc.pid)
            self.proc.wait(5)
        self._stderr.close()


def qmp_status(sock: str) -> str:
    """QEMU's run state, asked over QMP by a fresh connection."""
    import asyncio

    from hv.qemu.vm import VM

    async def go() -> str:
        async with VM("probe", sock) as vm:
            return await vm.status()
    return asyncio.run(go())


def guardian_pids(state_dir: Path) -> list[int]:
    """Guardian processes watching this state directory's guard file."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"hv.guardian" in argv and any(str(state_dir).encode() in a for a in argv):
            out.append(int(entry.name))
    return out


def bare_qemu(where: Path, name: str) -> tuple[Path, int]:
    """A QEMU hv did not start: plain ``-m 128M`` (QEMU makes its RAM backend itself),
    stopped before its first instruction (``-S``), QMP at ``where/NAME.sock``.
    Returns (socket, pid); the caller owns the process (``Guests.adopt``)."""
    from hv.qemu import accel

    sock, pidfile = where / f"{name}.sock", where / f"{name}.pid"
    subprocess.run([accel.QEMU, "-machine", "pc", "-accel", accel.choose().accel,
                    "-m", "128M", "-S", "-display", "none", "-nodefaults",
                    "-qmp", f"unix:{sock},server=on,wait=off", "-daemonize",
                    "-pidfile", str(pidfile)], check=True, capture_output=True, timeout=60)
    return sock, int(pidfile.read_text())
