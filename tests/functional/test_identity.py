"""Launch, attach and `hv run` with real guests (issue 10, cases 3, 4 and 5).

- A failed launch leaves nothing registered, so the same command can be run again.
- A VM is its QEMU process: the same socket by another path, or a second attach of a VM
  hv knows, is refused in one line; `hv status` lists each VM once.
- A configured VM whose QEMU is not running does not refuse `hv run`: the others are
  managed, and it is managed once it starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv.errors import LaunchError
from hv.qemu import accel, launch
from hv.units import MiB
from tests.conftest import hv_cli
from tests.functional.hvrun import HvRun, swap_fixture, write_config
from tests.functional.test_cli_errors import one_line_error

pytestmark = pytest.mark.guest

HOST = {"idle_collect_s": 0, "managed": "1G", "sample_pages": 100, "sample_period_s": 3,
        "poll_interval_s": 1, "share_interval_s": 0}
VM_LIMITS = {"min": "96M", "max": "128M"}


@pytest.fixture(scope="module")
def host_swap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield from swap_fixture(tmp_path_factory)


def registered(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir())


def test_failed_launch_leaves_nothing(run_dir: Path) -> None:
    # Too small to be a guest: refused before anything starts, the same twice.
    for _ in range(2):
        err = one_line_error(hv_cli("launch", "-n", "1", "-m", "1K", "-p", "rx"))
        assert "guest memory 1.00K must be a whole number of MiB, at least 96.0M" in err
    assert registered(run_dir) == []
    # QEMU itself refuses (a device that does not exist): it had created its socket.
    spec = launch.GuestSpec(name="rq", mem_bytes=128 * MiB, accel=accel.choose().accel,
                            extra_args=["-device", "no-such-device"])
    for _ in range(2):
        with pytest.raises(LaunchError, match="QEMU failed to start"):
            asyncio.run(launch.launch(spec))
        assert registered(run_dir) == []
    done = hv_cli("status")
    assert done.returncode == 0 and "no VMs known" in done.stdout, done.stderr


def test_one_qemu_is_one_vm(guests, run_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    g = guests.launch("ri1", mem="128M")
    sock = Path(g["socket"])
    # Another path to the same socket, and attaching a VM hv launched.
    roundabout = sock.parent / ".." / sock.parent.name / sock.name
    link = tmp_path / "link.sock"
    link.symlink_to(sock)
    for path in (sock, roundabout, link):
        err = one_line_error(hv_cli("attach", "again", str(path)))
        assert "already registered, as 'ri1'" in err, err
    status = json.loads(hv_cli("status", "--json").stdout)
    assert [row["vm"] for row in status["vms"]] == ["ri1"]
    # The same VM twice in hv run's configuration: refused at once, in one line.
    config = write_config(tmp_path / "twice.toml", HOST, {
        "a": {"socket": str(sock), **VM_LIMITS}, "b": {"socket": str(roundabout), **VM_LIMITS}})
    err = one_line_error(hv_cli("run", "--config", str(config), "--once", timeout_s=60))
    assert "is the socket of vm.a already" in err, err


def test_second_monitor_is_the_same_vm(guests, run_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two QMP sockets of one QEMU: `hv attach` and `hv run` see one VM (by pid)."""
    extra = tmp_path / "extra.sock"
    spec = launch.GuestSpec(name="mon", mem_bytes=128 * MiB, accel=accel.choose().accel,
                            extra_args=["-qmp", f"unix:{extra},server=on,wait=off"])

    async def go() -> int:
        vm = await launch.launch(spec)
        pid = vm.info.pid
        await vm.detach()
        return pid
    pid = asyncio.run(go())
    guests.adopt(pid, launch.console_log("mon"))
    err = one_line_error(hv_cli("attach", "other", str(extra)))
    assert f"leads to QEMU pid {pid}, already registered as 'mon'" in err, err
    config = write_config(tmp_path / "two-monitors.toml", HOST, {
        "a": {"socket": str(run_dir / "mon" / "qmp.sock"), **VM_LIMITS},
        "b": {"socket": str(extra), **VM_LIMITS}})
    err = one_line_error(hv_cli("run", "--config", str(config), "--once", timeout_s=60))
    assert f"leads to the QEMU of vm.a (pid {pid}) already" in err, err


def test_vm_not_running_at_start_waits(guests, host_swap, state_dir: Path, run_dir: Path,  # type: ignore[no-untyped-def]
                                       tmp_path: Path) -> None:
    live = guests.launch("w1", mem="128M")
    dead = guests.launch("w2", mem="128M")
    os.kill(dead["pid"], signal.SIGKILL)  # its socket stays, refusing connections
    config = write_config(tmp_path / "hv.toml", HOST, {
        "w1": {"socket": live["socket"], **VM_LIMITS}, "w2": dict(VM_LIMITS)})
    hv = HvRun(config, tmp_path / "events.jsonl")
    try:
        waiting = hv.wait_event("vm_waiting", 30, vm="w2")
        assert "refuses connections" in waiting["reason"]
        hv.wait_event("tick", 30, vm="w1")
        assert "w2: not running" in hv.stderr()
        # It starts: managed, without a restart of hv.
        assert hv_cli("stop", "w2").returncode == 0
        back = guests.launch("w2", mem="128M")
        hv.wait_event("vm_reattached", 30, vm="w2", pid=back["pid"])
        hv.wait_event("tick", 30, vm="w2")
        hv.check_alive()
    finally:
        rc = hv.stop()
    assert rc == 0, hv.stderr()
