"""Faults of QEMU under a running `hv run`: killed mid-action, stopped, its QMP connection lost.

Each case has a victim guest and a bystander, both managed by one real `hv run`.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.faults.inject import shut_qmp_connection, wait_proc_file
from tests.faults.runs import (
    QUIET_SAMPLE_PERIOD_S,
    assert_stopped_clean,
    guard_paused,
    start_hv,
    ticks_after,
)
from tests.functional.hvrun import HvRun, assert_ksm_restored, ksm_snapshot

pytestmark = pytest.mark.guest

# The victim is short of shares, so hv takes memory from it first.
VICTIM = {"min": "96M", "max": "256M", "shares": 50}
BYSTANDER = {"min": "128M", "max": "256M", "shares": 1000}

# Per action: the host section and the forced state that make hv do it to the victim.
ACTIONS: dict[str, tuple[dict[str, Any], str]] = {
    # A 550 MiB pool is roomy (real state high); forced soft, the victim's balloon
    # inflates toward its min.
    "balloon": ({"managed": "550M"}, "soft"),
    # Forced hard: the victim, far above its target, is paged out every tick.
    "pageout": ({"managed": "400M", "sample_period_s": QUIET_SAMPLE_PERIOD_S}, "hard"),
    # Forced low: the victim, above its target, is paused.
    "pause": ({"managed": "320M"}, "low"),
    # Sharing scans every second (CPU budget permitting), in the high state.
    "scan": ({"managed": "1G", "share_interval_s": 1,
              "sample_period_s": QUIET_SAMPLE_PERIOD_S}, "high"),
}


def _kill_when(hv: HvRun, action: str, victim: dict[str, Any]) -> float:
    """Wait for hv to be in the middle of ``action`` on the victim; SIGKILL its QEMU
    then.  Returns the time of the kill (Unix)."""
    name, pid = victim["name"], victim["pid"]
    if action in ("balloon", "pause"):
        # The balloon: the guest inflates for seconds after hv's QMP "balloon" (logged
        # right after).  The pause: the VM stays paused until hv resumes it.
        hv.wait_event(action, 60, vm=name)
    else:
        # hv opens the QEMU's /proc/PID/mem only while it scans that VM's pages: for a
        # page-out (choosing the pages) or a sharing round.  Wait for a first round, so
        # the sampler's own scan at start is long over.
        hv.wait_event("swap" if action == "pageout" else "share", 60,
                      **({"vm": name} if action == "pageout" else {}))
        wait_proc_file(hv.proc.pid, f"/proc/{pid}/mem", 60)
    os.kill(pid, signal.SIGKILL)
    return time.time()


@pytest.mark.parametrize("action", list(ACTIONS))
def test_qemu_killed_mid_action(action, guests, host_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    """QEMU SIGKILLed in the middle of a balloon, a page-out, a pause or a sharing scan.

    Promise: hv keeps running and managing the other VM (its ticks go on); the dead VM
    is reported once (``vm_gone``), not as a failed action or collection; nothing hv
    holds for it outlives it (the guard file forgets a VM hv had paused, so neither hv
    nor the guardian tries to resume a dead QEMU); a sharing round that lost its VM
    says so and the next round scans the others; at stop hv exits 0 with the bystander
    running, its guard file gone and KSM's tunables as they were.
    """
    host, forced = ACTIONS[action]
    if action == "pageout":
        victim = guests.launch("kv", mem="256M", workload="toucher", alloc_mib=100, ws=100)
        guests.wait_event(victim, "toucher_filled", timeout_s=60)
    else:  # hold 150 MiB of unique pages (resident, nothing to share)
        victim = guests.launch("kv", mem="256M", workload="hog", hog_mib=150, hog_hold_s=-1)
        guests.wait_event(victim, "hog_touched", timeout_s=60)
    bystander = guests.launch("kb", mem="256M")
    ksm_before = ksm_snapshot()
    force = tmp_path / "force"
    force.write_text(forced)
    hv = start_hv(tmp_path, host, {"kv": {"socket": victim["socket"], **VICTIM},
                                    "kb": {"socket": bystander["socket"], **BYSTANDER}},
                  "--force-state-file", str(force))
    try:
        killed_ts = _kill_when(hv, action, victim)
        gone = hv.wait_event("vm_gone", 30, vm="kv")
        ticks_after(hv, "kb", gone["ts"], count=3)
        # Reported once, as gone; no action or collection of it failed, nor any of the
        # bystander's.
        assert len(hv.events("vm_gone")) == 1, hv.events("vm_gone")
        assert not hv.events("act_failed") and not hv.events("collect_failed"), hv.events()
        assert not [t for t in hv.ticks("kv") if t["ts"] > gone["ts"]]
        if action == "balloon":
            # Killed before the balloon got there: no tick showed it at hv's goal.
            goal = hv.events("balloon", vm="kv")[0]["goal_bytes"]
            assert all(t["balloon_bytes"] > goal for t in hv.ticks("kv")), hv.ticks("kv")
        if action == "pageout":
            # Killed inside the page-out: it never completed (no swap line after the kill).
            assert not [e for e in hv.events("swap", vm="kv") if e["ts"] >= killed_ts]
        if action == "pause":
            # The guard file no longer holds the dead VM.
            wait_for(lambda: "kv" not in guard_paused(state_dir), 10, "the guard file to forget kv")
        if action == "scan":
            failed = hv.wait_event("share_failed", 30)
            assert "kv" in failed["error"] and "exited during the scan" in failed["error"], failed
            wait_for(lambda: [e for e in hv.events("share") if e["ts"] > failed["ts"]], 60,
                     "a sharing round after the failed one")
            assert len(hv.events("share_failed")) == 1
        force.write_text("high")  # the bystander is resumed if it was paused too
        wait_for(lambda: hv.last_tick("kb")["run_state"] == "running"
                 and not hv.last_tick("kb")["paused_by_hv"], 20, "kb running")
    finally:
        rc = hv.stop()
    assert_stopped_clean(hv, rc, bystander)
    assert "cannot resume" not in hv.stderr() and "hv-guardian" not in hv.stderr(), hv.stderr()
    assert not (state_dir / "daemon" / "guard.json").exists()
    assert_ksm_restored(hv.log, state_dir, ksm_before)


@pytest.mark.parametrize("stop_s", [30, 0])
def test_qemu_stopped(guests, host_swap, state_dir, tmp_path, stop_s):  # type: ignore[no-untyped-def]
    """QEMU SIGSTOPped for 30 s, then SIGCONT, while hv manages it and another guest; and
    (``stop_s`` 0) stopped only until hv notices, 10-20 s: shorter than the gap past
    which VM time stops counting anyway, so only the unanswered collection tells.

    Promise: the other VM's ticks keep coming about once a poll; the stopped VM is
    reported once (``collect_failed``) and left out while it does not answer, then
    reported once more when it answers (``collect_recovered``) and managed again,
    never dropped as gone; its working-set estimate is not fed a period in which it
    did not run (the period is discarded, not read as idle); hv stops cleanly after.
    """
    hung = guests.launch("ss", mem="256M", workload="toucher", alloc_mib=64, ws=64)
    other = guests.launch("so", mem="256M")
    guests.wait_event(hung, "toucher_filled", timeout_s=60)
    hv = start_hv(tmp_path, {"managed": "1G"}, {
        "ss": {"socket": hung["socket"], **BYSTANDER},
        "so": {"socket": other["socket"], **BYSTANDER}})
    try:
        hv.wait_event("sample", 30, vm="ss")
        periods_before = hv.last_tick("ss")["active"]["periods"]
        os.kill(hung["pid"], signal.SIGSTOP)
        stopped_ts = time.time()
        try:
            hv.wait_event("collect_failed", 30, vm="ss")
            # Hold the stop, watching hv tick the other VM meanwhile.
            if stop_s:
                ticks_after(hv, "so", stopped_ts + stop_s, count=1, timeout_s=stop_s + 15)
        finally:
            os.kill(hung["pid"], signal.SIGCONT)
        cont_ts = time.time()
        recovered = hv.wait_event("collect_recovered", 30, vm="ss")
        ticks_after(hv, "ss", recovered["ts"], count=2)
        times = [t["ts"] for t in hv.ticks("so") if stopped_ts - 1 <= t["ts"] <= cont_ts + 1]
        gaps = [b - a for a, b in zip(times, times[1:])]
        print(f"stopped {cont_ts - stopped_ts:.1f} s: other VM {len(gaps)} tick gaps, "
              f"max {max(gaps):.2f} s")
        assert len(gaps) >= (cont_ts - stopped_ts) * 2 // 3 and max(gaps) < 3.5, gaps
        assert len(hv.events("collect_failed")) == 1 and len(hv.events("collect_recovered")) == 1
        assert not hv.events("vm_gone")
        assert not [t for t in hv.ticks("ss") if stopped_ts + 11 < t["ts"] < cont_ts]
        # A period counts only the time the VM ran: none that fed the estimator counted
        # the stop as VM time, and one caught in the stop was discarded.
        for s in hv.events("sample", vm="ss"):
            begun = s["ts"] - s["wall_s"]
            stopped_within = max(0.0, min(s["ts"], cont_ts) - max(begun, stopped_ts))
            assert s["vm_s"] <= s["wall_s"] - stopped_within + 1.5, (s, stopped_ts, cont_ts)
        if stop_s >= 30:  # a period of which the VM ran too little is discarded
            assert hv.events("sample_discarded", vm="ss")
        assert hv.last_tick("ss")["active"]["periods"] >= periods_before
    finally:
        rc = hv.stop()
    assert_stopped_clean(hv, rc, hung, other)


def test_qmp_socket_closed(guests, host_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    """The QMP socket closed under hv: the socket file removed, then the connection shut
    down from QEMU's side, also while hv has the VM paused.

    Promise: with the file gone hv keeps managing over the connection it holds; when the
    connection drops it reports the VM once, waits quietly while there is no socket,
    and re-attaches the same QEMU when the socket is back; a VM hv paused stays hv's
    across the lost connection (in the guard file, resumed when the state allows), so
    no guest is left paused; the other VM is managed all along.
    """
    vm = guests.launch("qc", mem="256M", workload="toucher", alloc_mib=100, ws=100)
    other = guests.launch("qo", mem="256M")
    guests.wait_event(vm, "toucher_filled", timeout_s=60)
    sock = vm["socket"]
    keep = sock + ".keep"
    force = tmp_path / "force"
    force.write_text("")
    # A 400 MiB pool: high, and in forced low qc (short of shares) is paused.
    hv = start_hv(tmp_path, {"managed": "400M"}, {
        "qc": {"socket": sock, **VICTIM}, "qo": {"socket": other["socket"], **BYSTANDER}},
        "--force-state-file", str(force))
    try:
        first = ticks_after(hv, "qc", 0, count=2)[-1]
        # 1. The socket file removed (a hard link keeps the socket to put back).
        os.link(sock, keep)
        os.unlink(sock)
        ticks_after(hv, "qc", first["ts"] + 2, count=3)
        assert not hv.events("vm_gone") and not hv.events("collect_failed")

        # 2. ... then the connection shut down from QEMU's side: reported once, and hv
        # waits for a socket to come back, trying quietly.
        assert shut_qmp_connection(vm["pid"], sock) == 1
        gone = hv.wait_event("vm_gone", 20, vm="qc")
        ticks_after(hv, "qo", gone["ts"] + 5, count=2)
        assert len(hv.events("vm_gone")) == 1 and not hv.events("reattach_refused")
        os.rename(keep, sock)
        back = hv.wait_event("vm_reattached", 30, vm="qc")
        assert back["pid"] == vm["pid"]
        ticks_after(hv, "qc", back["ts"], count=2)

        # 3. Paused by hv (forced low), then the connection drops: after re-attaching,
        # the VM is still hv's to resume, and is resumed once the state allows.
        force.write_text("low")
        wait_for(lambda: [e for e in hv.events("pause", vm="qc") if e["ts"] > back["ts"]],
                 30, "hv to pause qc")
        assert "qc" in guard_paused(state_dir)
        assert shut_qmp_connection(vm["pid"], sock) == 1
        back2 = wait_for(lambda: [e for e in hv.events("vm_reattached", vm="qc")
                                  if e["ts"] > back["ts"]], 30, "qc re-attached again")[-1]
        assert "qc" in guard_paused(state_dir), "hv forgot it paused qc"
        force.write_text("high")
        wait_for(lambda: [e for e in hv.events("resume", vm="qc") if e["ts"] > back2["ts"]],
                 30, "hv to resume qc")
        t = ticks_after(hv, "qc", time.time(), count=1)[-1]
        assert t["run_state"] == "running" and not t["paused_by_hv"], t
    finally:
        if os.path.exists(keep):
            os.rename(keep, sock)
        rc = hv.stop()
    assert_stopped_clean(hv, rc, vm, other)
    assert not (state_dir / "daemon" / "guard.json").exists()
