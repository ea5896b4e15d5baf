"""`hv run` on real guests: overcommit, forced hard and low states, kill, restart, bad config.

Forced states come from a file the daemon reads every tick (``--force-state-file``),
so one run can go soft -> hard -> low -> high without exhausting 24 GiB; the real
state of a 500 MiB pool with two 256 MiB guests stays high.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hv.eventlog import read_events
from hv.units import MiB
from tests.conftest import hv_cli, wait_for
from tests.functional.hvrun import (
    HvRun,
    assert_ksm_restored,
    guardian_pids,
    ksm_snapshot,
    qmp_status,
    swap_fixture,
    write_config,
)

pytestmark = pytest.mark.guest

HOST = {"idle_collect_s": 0, "managed": "500M", "sample_pages": 200, "sample_period_s": 3, "poll_interval_s": 1,
        "share_interval_s": 3}


@pytest.fixture(scope="module")
def host_swap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield from swap_fixture(tmp_path_factory)


def test_overcommit_balloon_swap_pause(guests, host_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    # The idle guest wrote 150 MiB and freed it: the host still backs it (resident),
    # which is what ballooning it gives back.
    idle = guests.launch("idle1", mem="256M", workload="hog", hog_mib=150, hog_hold_s=1)
    act = guests.launch("act1", mem="256M", workload="toucher", alloc_mib=100, ws=100)
    guests.wait_event(act, "toucher_filled", timeout_s=60)
    guests.wait_event(idle, "hog_freed", timeout_s=60)
    # Room to grow for the active guest (its own need is ~190 MiB: 100 MiB working
    # set, the guest kernel and its boot reserve, 32 MiB headroom).
    done = hv_cli("balloon", "act1", "224M", "--wait", "30")
    assert done.returncode == 0, done.stderr
    ksm_before = ksm_snapshot()
    log = tmp_path / "events.jsonl"
    force = tmp_path / "force"

    # Admission control refuses a min that does not fit, saying how much is missing.
    bad = write_config(tmp_path / "big.toml", HOST, {
        "idle1": {"socket": idle["socket"], "min": "240M"},
        "act1": {"socket": act["socket"], "min": "240M"},
    })
    done = hv_cli("run", "--config", str(bad), "--log", str(log))
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "act1: refused: needs" in done.stderr and "more memory" in done.stderr

    # 1. Soft, equal shares: memory moves from the idle guest to the active one.
    # A 550 MiB pool: the guests hold ~410 MiB plus ~90 MiB overhead, so the real state
    # is high (500 MiB would already be low) and only the forced soft acts; the pool
    # (what they hold plus free memory above the high threshold) is short of their max.
    equal = write_config(tmp_path / "equal.toml", {**HOST, "managed": "550M"}, {
        "idle1": {"socket": idle["socket"], "min": "128M", "max": "256M"},
        "act1": {"socket": act["socket"], "min": "128M", "max": "256M"},
    })
    force.write_text("soft")
    hv = HvRun(equal, log, "--force-state-file", str(force))
    try:
        def moved() -> bool:
            hv.check_alive()
            i, a = hv.ticks("idle1"), hv.ticks("act1")
            # Targets are host memory: the idle guest's balloon inflates until what the
            # host backs of it is down to its target; the active one's deflates.
            return bool(i and a and i[-1]["balloon_bytes"] <= 240 * MiB
                        and i[-1]["resident_bytes"] <= i[-1]["target_bytes"] + 4 * MiB
                        and a[-1]["balloon_bytes"] >= 240 * MiB)
        wait_for(moved, 90, "the idle guest's balloon to inflate and the active one's to deflate")
        i, a = hv.last_tick("idle1"), hv.last_tick("act1")
        print(f"soft: idle1 target {i['target_bytes'] / MiB:.0f}M balloon "
              f"{i['balloon_bytes'] / MiB:.0f}M active {i['active']['of_allocation']:.3f}; act1 "
              f"target {a['target_bytes'] / MiB:.0f}M balloon {a['balloon_bytes'] / MiB:.0f}M "
              f"active {a['active']['of_allocation']:.3f}")
        assert a["target_bytes"] > i["target_bytes"]
        # Soft pages out only a VM whose balloon stopped short of its target (here the
        # idle guest's own need, above its 128 MiB target), never the active one.
        assert not hv.events("swap", vm="act1") and not hv.events("pause")
        assert all(e["why"] == "balloon cannot reach target" for e in hv.events("swap"))
        # While hv run holds the QMP sockets, `hv status` shows its last tick and
        # `hv balloon` says who manages the VM, in one line.
        shown = hv_cli("status", "idle1", "act1", "--json")
        assert shown.returncode == 0, shown.stderr
        rows = {r["vm"]: r for r in json.loads(shown.stdout)["vms"]}
        assert rows["act1"]["managed_by"]["hv_run_pid"] == hv.proc.pid
        # The row is one of the daemon's ticks (the balloon keeps moving between ticks).
        shown_tick = (rows["act1"]["target_bytes"], rows["act1"]["balloon_bytes"])
        assert shown_tick in {(t["target_bytes"], t["balloon_bytes"]) for t in hv.ticks("act1")}
        busy = hv_cli("balloon", "act1", "200M")
        assert busy.returncode != 0 and len(busy.stderr.strip().splitlines()) == 1
        assert f"`hv run` (pid {hv.proc.pid}) manages" in busy.stderr
    finally:
        stopped = hv.stop()  # always stop hv; judge how it stopped once the test's own checks ran
    assert stopped == 0, hv.stderr()
    assert qmp_status(idle["socket"]) == "running" and qmp_status(act["socket"]) == "running"
    assert (state_dir / "vms" / "act1" / "estimator.json").exists()

    # 2. Restart with a smaller pool and the active guest's shares cut, so its target
    # (its min, 96 MiB) falls far below what it holds (~165 MiB): hard swaps its pages out (after raising KSM's rate), low pauses it,
    # high resumes it.  The restarted hv resumes the saved estimates.
    cut = write_config(tmp_path / "cut.toml", {**HOST, "managed": "400M"}, {
        "idle1": {"socket": idle["socket"], "min": "128M", "max": "256M", "shares": 1000},
        "act1": {"socket": act["socket"], "min": "96M", "max": "256M", "shares": 50},
    })
    force.write_text("hard")
    hv = HvRun(cut, log, "--force-state-file", str(force))
    try:
        loaded = hv.wait_event("estimator_loaded", 20, vm="act1")
        assert loaded["periods"] >= 1
        swap_before = hv.wait_event("tick", 20, vm="act1")["swap_bytes"]
        # Share before swap: KSM runs under hv's governor, which the sharing scan has
        # steered before any page is swapped (swapping may wait up to 30 s for it).
        hv.wait_event("ksm_raised", 20)
        swapped = hv.wait_event("swap", 60, vm="act1")
        assert swapped["invalidated"] > 0
        kinds = [e["event"] for e in read_events(log) if e["event"] in ("share", "swap")]
        assert kinds.index("share") < kinds.index("swap"), kinds
        wait_for(lambda: hv.last_tick("act1")["swap_bytes"] >= swap_before + 16 * MiB, 30,
                 "act1's host swap to grow by 16 MiB")
        assert not hv.events("swap", vm="idle1")
        a = hv.last_tick("act1")
        print(f"hard: act1 target {a['target_bytes'] / MiB:.0f}M resident "
              f"{a['resident_bytes'] / MiB:.0f}M swap {swap_before / MiB:.0f}M -> "
              f"{a['swap_bytes'] / MiB:.0f}M")

        force.write_text("low")
        hv.wait_event("pause", 30, vm="act1")
        assert not hv.events("pause", vm="idle1")

        force.write_text("high")
        wait_for(lambda: (hv.last_tick("act1")["state"] == "high"
                          and not hv.last_tick("act1")["paused_by_hv"]), 20, "act1 resumed")
        assert hv.events("resume", vm="act1")
        # QMP takes one client at a time: while hv holds it, its ticks tell the run state.
        wait_for(lambda: hv.last_tick("act1")["run_state"] == "running", 10, "act1 running")
    finally:
        stopped = hv.stop()  # always stop hv; judge how it stopped once the test's own checks ran
    assert stopped == 0, hv.stderr()
    assert qmp_status(idle["socket"]) == "running" and qmp_status(act["socket"]) == "running"
    assert_ksm_restored(log, state_dir, ksm_before)
    assert not (state_dir / "daemon" / "guard.json").exists()


def test_kill_leaves_guests_running_and_restart_resumes(guests, host_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    act = guests.launch("act2", mem="256M", workload="toucher", alloc_mib=100, ws=100)
    guests.wait_event(act, "toucher_filled", timeout_s=60)
    ksm_before = ksm_snapshot()
    log = tmp_path / "events.jsonl"
    # First a roomy pool, so act2 runs and is sampled; then (SIGHUP reload) one VM in a
    # 150 MiB pool: its target (150 - 44 MiB overhead) is below what it holds, so in
    # the (forced) low state hv pauses it.
    roomy = {**HOST, "managed": "1G", "sample_period_s": 2}
    vms = {"act2": {"socket": act["socket"], "min": "96M", "max": "256M"}}
    config = write_config(tmp_path / "hv.toml", roomy, vms)
    force = tmp_path / "force"
    hv = HvRun(config, log, "--force-state-file", str(force))
    guard = state_dir / "daemon" / "guard.json"
    try:
        hv.wait_event("sample", 30, vm="act2")
        hv.wait_event("ksm_raised", 30)
        write_config(config, {**roomy, "managed": "150M"}, vms)
        force.write_text("low")
        hv.proc.send_signal(signal.SIGHUP)
        hv.wait_event("reload", 20)

        def paused_now() -> bool:
            hv.check_alive()
            return len(hv.events("pause", vm="act2")) > len(hv.events("resume", vm="act2"))
        wait_for(paused_now, 30, "hv to pause act2", interval_s=0.02)
        assert "act2" in guard.read_text()
        os.kill(hv.proc.pid, signal.SIGKILL)
        hv.proc.wait(10)
    finally:
        hv.close()
    # The guardian resumes the guest and restores KSM.
    wait_for(lambda: not guard.exists(), 20, "the guardian to undo the dead hv's changes")
    assert qmp_status(act["socket"]) == "running"
    assert not (state_dir / "ksm-saved.json").exists()
    # The guardian restored KSM (Ksm.restore removes the saved record last); the
    # tunables are as hv found them unless another KSM user changed them meanwhile.
    ksm_saved = {k: v for k, v in next(read_events(log, "ksm_raised"))["saved"].items()
                 if k in ksm_before}
    assert ksm_saved == ksm_before == ksm_snapshot()
    wait_for(lambda: not guardian_pids(state_dir), 10, "the guardian to exit")
    last_sample = hv.events("sample", vm="act2")[-1]

    # Restart: the estimator comes back as it was.
    calm = write_config(tmp_path / "calm.toml", {**HOST, "managed": "1G"},
                        {"act2": {"socket": act["socket"], "min": "96M", "max": "256M"}})
    done = hv_cli("run", "--config", str(calm), "--log", str(log), "--once")
    assert done.returncode == 0, done.stderr
    events = [e for e in read_events(log, "estimator_loaded") if e["vm"] == "act2"]
    assert events and events[-1]["slow"] == last_sample["slow"]
    assert events[-1]["fast"] == last_sample["fast"]
    tick = [e for e in read_events(log, "tick") if e["vm"] == "act2"][-1]
    assert tick["active"]["slow"] == last_sample["slow"]  # used from the first tick on
    assert qmp_status(act["socket"]) == "running"


@pytest.mark.parametrize("table, message", [
    ({"min": "300M", "max": "256M"}, "vm.g.min: 300.0M is larger than max 256.0M"),
    ({"min": "128M", "shares": 0}, "vm.g.shares: must be more than 0"),
    ({"min": "128M", "colour": "blue"}, "vm.g.colour: unknown key"),
    ({"min": "128M", "socket": "REGULAR"}, "is a regular file, not a QMP socket"),
])
def test_bad_config_refused(tmp_path: Path, state_dir: Path, run_dir: Path,
                            table: dict[str, Any], message: str) -> None:
    # A socket file nobody listens on any more: connecting is refused.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    regular = tmp_path / "notes.txt"
    regular.write_text("not a socket\n")
    table = {**table, "socket": str(regular)} if table.get("socket") == "REGULAR" else table
    config = write_config(tmp_path / "bad.toml", {"managed": "1G"},
                          {"g": {"socket": str(dead), **table}})
    started = time.monotonic()
    done = hv_cli("run", "--config", str(config))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert lines[0].startswith("hv: error: ")
    assert time.monotonic() - started < 30
    assert not (state_dir / "daemon" / "guard.json").exists()
