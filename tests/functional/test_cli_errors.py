"""Bad input gets one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from hv.units import MiB
from tests.conftest import Guests, hv_cli, wait_for
from tests.functional.test_vm_qmp import guest_stats


def one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hv: ")
    return lines[0]


@pytest.mark.parametrize("size", ["12Q", "-5M", "", "1.5.3G", "0", "9" * 400 + "G", "99999999999999G"])
def test_bad_sizes(run_dir: Path, size: str) -> None:
    err = one_line_error(hv_cli("balloon", "whatever", size))
    assert "size" in err


@pytest.mark.parametrize("args, words", [
    (("balloon", "whatever", "170M", "--wait", "-1"), "--wait"),
    (("balloon", "whatever", "170M", "--wait", "nan"), "--wait"),
    (("balloon", "whatever", "170M", "--wait", "-1e+16"), "--wait"),
    (("balloon", "whatever", "170M", "--wait", "-inf"), "--wait"),
    (("sample", "whatever", "--period", "nan"), "--period"),
    (("swap", "create", "99999999999999G"), "too large"),
    (("launch", "-n", "1", "-p", "bad/name"), "bad VM name"),
    (("launch", "-n", "1", "-m", "100.5M"), "whole number of MiB"),
    (("launch", "-n", "1", "--param", "nokey"), "KEY=VALUE"),
    (("launch", "-n", "99999999999999999999"), "--count"),
    (("share", "whatever", "--interval", "nan"), "--interval"),
])
def test_bad_numbers_change_nothing(run_dir: Path, args: tuple[str, ...], words: str) -> None:
    """Checked before anything is looked up or changed: no VM named "whatever" exists,
    and the error is about the argument, not about the VM."""
    r = hv_cli(*args)
    assert r.returncode == 2 and words in one_line_error(r)


def test_missing_vm_and_missing_socket(run_dir: Path, tmp_path: Path) -> None:
    assert "no VM by that name" in one_line_error(hv_cli("balloon", "ghost", "128M"))
    assert "no such QMP socket" in one_line_error(hv_cli("status", str(tmp_path / "none.sock")))


def test_dead_socket(run_dir: Path, tmp_path: Path) -> None:
    """A socket file nobody listens on (QEMU died and left it)."""
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    err = one_line_error(hv_cli("balloon", str(path), "128M"))
    assert "refuses connections" in err


def test_socket_that_never_greets(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    try:
        err = one_line_error(hv_cli("status", str(path)))
        assert "did not greet" in err
    finally:
        s.close()


def test_targets_out_of_range(guests: Guests) -> None:
    g = guests.launch("range", mem="256M")
    guests.wait_event(g, "ready", 90)
    assert "above the VM's maximum" in one_line_error(hv_cli("balloon", "range", "300M"))
    assert "below the safe floor" in one_line_error(hv_cli("balloon", "range", "32M"))


def test_target_below_guest_use(guests: Guests) -> None:
    g = guests.launch("busy", mem="256M", workload="hog", hog_mib=150)
    guests.wait_event(g, "hog_touched", 90)
    # Guest statistics lag by up to one polling period: wait until they show the hog.
    wait_for(lambda: (guest_stats(g["socket"]).available_bytes or 1 << 40) < 100 * MiB, 30,
             "guest statistics to show the hog's 150 MiB in use")
    err = one_line_error(hv_cli("balloon", "busy", "100M"))
    assert "below what the guest needs" in err


def test_vm_dies_mid_operation(guests: Guests) -> None:
    g = guests.launch("dying", mem="256M")
    guests.wait_event(g, "ready", 90)
    # A paused guest never inflates its balloon, so `--wait` is still polling when
    # QEMU is killed under it.
    assert hv_cli("pause", "dying").returncode == 0
    timer = threading.Timer(8.0, os.kill, (g["pid"], signal.SIGKILL))
    timer.start()
    try:
        err = one_line_error(hv_cli("balloon", "dying", "128M", "--wait", "60"))
    finally:
        timer.cancel()
    assert "went away" in err or "exited" in err or "refuses" in err


def test_vm_without_balloon_device(guests: Guests, run_dir: Path, tmp_path: Path) -> None:
    """A bare QEMU (stopped at reset, no balloon) is reported, and ballooning it refused."""
    import json
    import subprocess

    sock = tmp_path / "bare.sock"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "128", "-S",
                             "-display", "none", "-nodefaults",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    guests.adopt(qemu.pid)
    wait_for(sock.exists, 30, "the bare QEMU's QMP socket")
    r = hv_cli("status", str(sock), "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["vms"][0]
    assert row["pid"] == qemu.pid and row["balloon_bytes"] is None
    assert row["run_state"] == "prelaunch"
    assert "has no virtio-balloon device" in one_line_error(hv_cli("balloon", str(sock), "100M"))
