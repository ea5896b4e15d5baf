"""Real guests, their memory controlled and observed over QMP (issue: guests and QMP)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from hv.qemu.vm import VM, GuestStats, balloon_floor
from hv.units import MiB, parse_size
from tests.conftest import Guests, console_events, hv_cli, wait_for

pytestmark = pytest.mark.guest

GUEST_BOOT_S = 90  # TCG boots the guest in ~5 s; leave room for a loaded CI machine


def guest_stats(sock: str, min_update: float = 0.0) -> GuestStats:
    async def go() -> GuestStats:
        async with VM("t", sock) as vm:
            return await vm.guest_stats()
    return asyncio.run(go())


def fresh_total(sock: str, predicate, timeout_s: float = 30) -> int:  # type: ignore[no-untyped-def]
    """Poll the guest's own total memory until ``predicate(total)`` holds."""
    def probe() -> int | None:
        total = guest_stats(sock).total_bytes
        return total if total is not None and predicate(total) else None
    return int(wait_for(probe, timeout_s, "guest total memory to follow the balloon", 1.0))


def test_balloon_round_trip(guests: Guests) -> None:
    g = guests.launch("rt", mem="256M")
    ready = guests.wait_event(g, "ready", GUEST_BOOT_S)
    assert ready["balloon"] == "1"
    total0 = fresh_total(g["socket"], lambda t: t > 0)
    assert abs(total0 - int(ready["memtotal_kib"]) * 1024) < 8 * MiB

    r = hv_cli("balloon", "rt", "128M", "--wait", "60")
    assert r.returncode == 0, r.stderr
    async def actual() -> int:
        async with VM("rt", g["socket"]) as vm:
            return await vm.balloon_actual()
    assert abs(asyncio.run(actual()) - 128 * MiB) <= 4 * MiB
    # The guest's own total falls by the ballooned 128 MiB (no deflate-on-oom).
    total_down = fresh_total(g["socket"], lambda t: t < total0 - 100 * MiB)
    assert abs((total0 - total_down) - 128 * MiB) <= 8 * MiB
    # ... and so does what the guest itself prints from /proc/meminfo.
    wait_for(lambda: any(int(e["memtotal_kib"]) * 1024 < total0 - 100 * MiB
                         for e in console_events(g["console"], "report")),
             30, "the guest's console to report the smaller MemTotal")

    r = hv_cli("balloon", "rt", "256M", "--wait", "60")
    assert r.returncode == 0, r.stderr
    assert abs(asyncio.run(actual()) - 256 * MiB) <= 4 * MiB
    total_up = fresh_total(g["socket"], lambda t: t > total0 - 8 * MiB)
    assert abs(total_up - total0) <= 8 * MiB


def test_ballooning_returns_touched_memory_to_host(guests: Guests) -> None:
    touched_mib = 150
    g = guests.launch("hog", mem="256M", workload="hog", hog_mib=touched_mib, hog_hold_s=1)
    guests.wait_event(g, "hog_freed", GUEST_BOOT_S)
    # Guest statistics lag by up to one polling period, and one can be taken while the
    # hog's exit is still freeing: wait until they show the guest back to idle use.
    # (An idle guest uses 26-30 MiB; `hv balloon` refuses a target below use +
    # kernel-reserved (about 39 MiB) + 32 MiB headroom.)
    def idle_use() -> bool:
        s = guest_stats(g["socket"])
        return (s.total_bytes is not None and s.available_bytes is not None
                and s.total_bytes - s.available_bytes < 36 * MiB)
    wait_for(idle_use, 30, "guest statistics to show the hog's memory freed")

    async def rss() -> int:
        async with VM("hog", g["socket"]) as vm:
            return vm.host_usage().rss_bytes
    rss_before = asyncio.run(rss())
    assert rss_before >= touched_mib * MiB, "the hog's pages should be resident in the host"

    target = 110 * MiB
    r = hv_cli("balloon", "hog", str(target), "--wait", "90")
    assert r.returncode == 0, r.stderr
    rss_after = asyncio.run(rss())
    ballooned = 256 * MiB - target
    out_of_touched = min(ballooned, touched_mib * MiB)
    fell = rss_before - rss_after
    assert fell >= 0.8 * out_of_touched, (
        f"host RSS fell by {fell / MiB:.1f} MiB; expected >= 80% of {out_of_touched / MiB:.0f} MiB")
    hv_cli("balloon", "hog", "256M", "--wait", "60")


def test_status_shows_live_guests(guests: Guests) -> None:
    a = guests.launch("s1", mem="192M")
    b = guests.launch("s2", mem="256M")
    for g in (a, b):
        guests.wait_event(g, "ready", GUEST_BOOT_S)
        fresh_total(g["socket"], lambda t: t > 0)
    r = hv_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["vm"]: row for row in json.loads(r.stdout)["vms"]}
    assert set(rows) == {"s1", "s2"}
    for g, mem in ((a, 192 * MiB), (b, 256 * MiB)):
        row = rows[g["name"]]
        assert row["pid"] == g["pid"]
        assert row["max_bytes"] == mem
        assert row["balloon_bytes"] == mem
        assert row["run_state"] == "running"
        assert 0 < row["guest"]["free_bytes"] <= row["guest"]["total_bytes"] <= mem
        assert row["guest"]["available_bytes"] > 0
        assert 0 < row["host_resident_bytes"] <= mem
        assert row["ram"][0]["size"] == mem
    table = hv_cli("status")
    assert table.returncode == 0 and "s1" in table.stdout and "GUEST-FREE" in table.stdout


def test_pause_and_resume(guests: Guests) -> None:
    g = guests.launch("pr", mem="128M")
    guests.wait_event(g, "ready", GUEST_BOOT_S)
    r = hv_cli("pause", "pr")
    assert r.returncode == 0 and "paused" in r.stdout, r.stderr
    shown = json.loads(hv_cli("status", "pr", "--json").stdout)["vms"][0]
    assert shown["run_state"] == "paused"
    n = len(console_events(g["console"], "report"))
    # The observation window of a negative check: a running guest reports every 2 s,
    # so 3 s without a report shows the vCPUs really stopped.
    time.sleep(3)
    assert len(console_events(g["console"], "report")) == n
    r = hv_cli("resume", "pr")
    assert r.returncode == 0 and "running" in r.stdout, r.stderr
    wait_for(lambda: len(console_events(g["console"], "report")) > n, 30, "reports after resume")


def test_manages_a_qemu_it_did_not_start(guests: Guests, run_dir: Path, tmp_path: Path) -> None:
    """A QEMU started by hand, with its own command line, driven through hv."""
    from hv import paths
    from hv.qemu import accel
    sock = tmp_path / "foreign.sock"
    log = tmp_path / "foreign.log"
    cmd = ["qemu-system-x86_64", "-accel", accel.choose().accel, "-m", "192",
           "-kernel", str(paths.guest_kernel()), "-initrd", str(paths.guest_initrd()),
           "-append", "console=ttyS0 hv.workload=idle", "-device", "virtio-balloon-pci",
           "-qmp", f"unix:{sock},server=on,wait=off", "-serial", f"file:{log}",
           "-display", "none", "-nodefaults", "-no-reboot"]
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    guests.adopt(qemu.pid, log)
    wait_for(lambda: sock.exists(), 30, "the foreign QEMU's QMP socket")
    wait_for(lambda: console_events(log, "ready"), GUEST_BOOT_S, "the foreign guest to boot")

    r = hv_cli("attach", "foreign", str(sock))
    assert r.returncode == 0, r.stderr
    r = hv_cli("status", "foreign", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["vms"][0]
    assert row["pid"] == qemu.pid
    assert row["max_bytes"] == 192 * MiB
    assert row["ram"][0]["block"] == "pc.ram"  # no memory backend: QEMU's default block
    r = hv_cli("balloon", "foreign", "128M", "--wait", "60")
    assert r.returncode == 0, r.stderr
    r = hv_cli("status", str(sock), "--json")  # by socket path, too
    assert json.loads(r.stdout)["vms"][0]["balloon_bytes"] == 128 * MiB
    # Forgetting a VM hv did not start leaves it running.
    r = hv_cli("stop", "foreign")
    assert r.returncode == 0 and "keeps running" in r.stdout
    assert qemu.poll() is None
    assert not (run_dir / "foreign").exists()


def test_run_guests_script_launches_and_stops(run_dir: Path, guests: Guests) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "run_guests.sh"
    env = {**os.environ, "HV_BIN": str(Path(os.sys.executable).parent / "hv")}
    r = subprocess.run([str(script), "-n", "2", "-m", "128M", "-p", "rg"], capture_output=True,
                       text=True, env=env, timeout=120)
    pids = [int((run_dir / n / "qemu.pid").read_text()) for n in ("rg1", "rg2")
            if (run_dir / n / "qemu.pid").exists()]
    for pid in pids:
        guests.adopt(pid, run_dir / f"rg{pids.index(pid) + 1}" / "console.log")
    assert r.returncode == 0, r.stderr
    assert "rg1" in r.stdout and "rg2" in r.stdout
    assert len(pids) == 2
    for n in ("rg1", "rg2"):
        assert oct((run_dir / n / "qmp.sock").stat().st_mode & 0o777) == "0o600"
        cmdline = json.loads((run_dir / n / "meta.json").read_text())["command"]
        assert any("merge=on" in a for a in cmdline)
    r = subprocess.run([str(script), "--stop"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for pid in pids:
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 15, f"qemu {pid} to exit")


def test_floor_is_documented_value() -> None:
    assert balloon_floor(256 * MiB) == 96 * MiB
    assert balloon_floor(4096 * MiB) == 512 * MiB
    assert parse_size("64M") == 64 * MiB
