"""Shared fixtures: a private run directory, and a factory that owns every guest.

The factory kills every QEMU a test started, even when the test fails, and prints
the tail of each guest's console log for a failed test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from hv.host.ksm import Ksm

REPO = Path(__file__).resolve().parent.parent
HV = [sys.executable, "-m", "hv.cli"]


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy, against a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def console_events(log: Path, event: str) -> list[dict[str, str]]:
    """The ``hv-guest: event=EVENT k=v ...`` lines of a console log, parsed (whole
    lines only: QEMU may be writing the last one)."""
    from hv.bench.fleet import events_in
    return events_in(log, event)


def kill_pid(pid: int, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL; returns once the process is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            try:  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HV_STATE_DIR for this test."""
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("HV_STATE_DIR", str(d))
    return d


@pytest.fixture
def ksm(state_dir: Path) -> Iterator["Ksm"]:
    """KSM, with every tunable the test changes put back at teardown."""
    from hv.host.ksm import Ksm
    k = Ksm()
    try:
        yield k
    finally:
        k.restore()  # puts back what Ksm.set saved before the first change
        assert not k.saved_file.exists()


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HV_RUN_DIR for this test (the accelerator verdict is shared)."""
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setenv("HV_RUN_DIR", str(d))
    shared = Path("/run/hv/accel.json")
    if "HV_ACCEL" not in os.environ:
        from hv.qemu import accel
        if not shared.exists():
            monkeypatch.setenv("HV_RUN_DIR", "/run/hv")
            accel.choose()
            monkeypatch.setenv("HV_RUN_DIR", str(d))
        shutil.copy(shared, d / "accel.json")
    return d


def hv_cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``hv`` command as a user would."""
    return subprocess.run([*HV, *args], capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO, env={**os.environ, **(env or {})})


class Guests:
    """Launches guests through hv and owns them until teardown."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.pids: list[int] = []
        self.logs: list[Path] = []

    def launch(self, name: str, mem: str = "256M", workload: str = "idle",
               initrd: str | None = None, disk: str | None = None, thp: bool = True,
               **params: object) -> dict[str, Any]:
        """Launch one guest; returns its info (pid, socket, console path).  ``thp``
        False: its RAM without transparent huge pages."""
        from hv.qemu import accel, launch
        from hv.units import parse_size

        spec = launch.GuestSpec(name=name, mem_bytes=parse_size(mem), workload=workload,
                                params={k: str(v) for k, v in params.items()},
                                accel=accel.choose().accel, initrd=initrd, disk=disk, thp=thp)

        async def go() -> dict[str, Any]:
            vm = await launch.launch(spec)
            info = vm.info
            await vm.detach()
            return {"name": name, "pid": info.pid, "socket": info.socket, "info": info,
                    "console": launch.console_log(name)}

        try:
            out = asyncio.run(go())
        finally:
            pidfile = self.run_dir / name / "qemu.pid"
            if pidfile.exists():
                self.pids.append(int(pidfile.read_text()))
            self.logs.append(self.run_dir / name / "console.log")
        return out

    def adopt(self, pid: int, log: Path | None = None) -> None:
        """Own a QEMU the test started by hand."""
        self.pids.append(pid)
        if log is not None:
            self.logs.append(log)

    def wait_event(self, guest: dict[str, Any], event: str, timeout_s: float = 60) -> dict[str, str]:
        found = wait_for(lambda: console_events(guest["console"], event), timeout_s,
                         f"{guest['name']}: event={event} on the console")
        return found[-1]  # type: ignore[no-any-return]

    def teardown(self, failed: bool) -> None:
        for pid in self.pids:
            kill_pid(pid)
        if failed:
            for log in self.logs:
                if log.exists():
                    tail = log.read_text(errors="replace").splitlines()[-30:]
                    sys.stderr.write(f"\n--- console {log} (last 30 lines) ---\n" + "\n".join(tail) + "\n")


def pytest_sessionstart(session: pytest.Session) -> None:
    """hv's tests need root (pagemap frames, kpageflags, KSM, swap): say so once."""
    if os.geteuid() != 0:
        raise pytest.UsageError("hv's tests need root: pagemap frame numbers, kpageflags, "
                                "KSM, swap and QEMU's guests")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def guests(run_dir: Path, request: pytest.FixtureRequest) -> Iterator[Guests]:
    factory = Guests(run_dir)
    yield factory
    rep = getattr(request.node, "rep_call", None)
    factory.teardown(failed=bool(rep and rep.failed))
