"""Faults of hv's state directory: a full file system, corrupt files, two daemons."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from hv.policy import WorkingSetEstimator
from hv.sharing import state as page_state
from tests.conftest import hv_cli, wait_for
from tests.faults.inject import fill_fs, small_tmpfs
from tests.faults.runs import HOST, assert_no_traceback, start_hv, ticks_after, wait_started
from tests.functional.hvrun import (
    HvRun,
    assert_ksm_restored,
    guardian_pids,
    ksm_snapshot,
    qmp_status,
    write_config,
)

pytestmark = pytest.mark.guest

LIMITS = {"min": "128M", "max": "256M"}


def _console_reports(guest: dict[str, object]) -> int:
    """How many reports the guest printed on its console (a paused guest prints none)."""
    return Path(str(guest["console"])).read_text(errors="replace").count("event=report")


def test_state_dir_full(guests, host_swap, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The state directory on a file system that is nearly full at start, then full, then
    has room again (a 4 MiB tmpfs as HV_STATE_DIR; the event log in it, its default place).

    Promise: hv starts and keeps running and deciding throughout; what it cannot write it
    reports once per file on stderr, and in the event log once it can write again (how
    many events were lost), never as a crash or a torn file: the last good status and
    estimates stay readable; a VM is never paused without the guard record that lets the
    guardian resume it (the pause is refused and said, the guest keeps running); a
    page-state file that does not fit is refused, not mapped over holes (no SIGBUS).
    Once there is room again, the pause happens, status and sharing resume; at stop KSM
    is restored, the guard file removed, no temporary file left, nothing left mounted.
    """
    g1 = guests.launch("fs1", mem="256M", workload="toucher", alloc_mib=100, ws=100)
    g2 = guests.launch("fs2", mem="256M")
    guests.wait_event(g1, "toucher_filled", timeout_s=60)
    ksm_before = ksm_snapshot()
    force = tmp_path / "force"
    force.write_text("")
    with small_tmpfs("4m") as sd:
        monkeypatch.setenv("HV_STATE_DIR", str(sd))
        filler = fill_fs(sd)
        os.truncate(filler, filler.stat().st_size - 512 * 1024)  # 512 KiB left: JSON fits
        log = sd / "daemon" / "events.jsonl"
        config = write_config(tmp_path / "hv.toml", {
            # A 400 MiB pool: high; in forced low fs1 (short of shares) is paused.
            **HOST, "managed": "400M", "sample_period_s": 2, "share_interval_s": 1}, {
            "fs1": {"socket": g1["socket"], "min": "96M", "max": "256M", "shares": 50},
            "fs2": {"socket": g2["socket"], **LIMITS}})
        # hv's stderr outside the full file system: notices must reach the operator.
        hv = HvRun(config, log, "--force-state-file", str(force), stderr_dir=tmp_path)
        try:
            # 1. Nearly full: a page-state file (1.3 MiB per 256 MiB guest) does not fit.
            hv.wait_event("sample", 30, vm="fs1")
            failed = hv.wait_event("share_failed", 30)
            assert "fs1.pages" in failed["error"] or "fs2.pages" in failed["error"], failed
            # 2. Full: hv goes on, says what it cannot write, and refuses to pause fs1
            # without a guard record: the guest keeps running.
            fill_fs(sd)
            full_ts = time.time()
            force.write_text("low")
            wait_for(lambda: "cannot write the guard file" in hv.stderr(), 30,
                     "hv to refuse a pause it cannot record")
            reports = _console_reports(g1)
            wait_for(lambda: _console_reports(g1) >= reports + 2, 20, "fs1 to keep running")
            hv.check_alive()
            # The last good files are still whole.
            assert json.loads((sd / "daemon" / "status.json").read_text())["pid"] == hv.proc.pid
            est = json.loads((sd / "vms" / "fs1" / "estimator.json").read_text())
            WorkingSetEstimator.from_dict(est["estimator"])
            # 3. Room again: the log says what it lost, the pause happens (recorded),
            # status and sharing resume.
            filler.unlink()
            gap = hv.wait_event("log_gap", 30)
            assert gap["lost"] > 0 and gap["ts"] > full_ts
            wait_for(lambda: [e for e in hv.events("pause", vm="fs1") if e["ts"] >= gap["ts"]],
                     30, "hv to pause fs1 once it can record it")
            assert not [e for e in hv.events("pause") if e["ts"] < gap["ts"]]
            assert "fs1" in json.loads((sd / "daemon" / "guard.json").read_text())["paused"]
            wait_for(lambda: json.loads((sd / "daemon" / "status.json").read_text())["time"]
                     > gap["ts"], 20, "a fresh status.json")
            wait_for(lambda: [e for e in hv.events("share") if e["ts"] > gap["ts"]], 60,
                     "a sharing round once there is room")
            force.write_text("high")
            hv.wait_event("resume", 30, vm="fs1")
            notices = [ln for ln in hv.stderr().splitlines() if "cannot write" in ln]
            assert len(notices) == len(set(notices)), notices  # once each, not per tick
        finally:
            rc = hv.stop()
        assert rc == 0, hv.stderr()
        assert_no_traceback(hv)
        assert not (sd / "daemon" / "guard.json").exists()
        assert not list(sd.rglob("*.tmp")), list(sd.rglob("*.tmp"))
        assert_ksm_restored(log, sd, ksm_before)
        wait_for(lambda: not guardian_pids(sd), 10, "the guardian to exit")
    assert not os.path.ismount(sd)
    assert qmp_status(g1["socket"]) == "running" and qmp_status(g2["socket"]) == "running"


def test_corrupt_state_files(guests, host_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    """Corrupt or truncated estimator, page-state, status, guard and KSM-record files.

    Promise: `hv run` starts and manages every VM anyway; each unusable estimate is named
    once (file and reason) and started afresh, never half-trusted; a bad page-state file
    is replaced by a fresh one (sharing goes on); a garbled guard file or KSM record
    refuses nothing and leaves KSM as it was; a status file that names a live pid with
    the wrong start time is not taken for a running daemon.  After a run every file is
    whole again.
    """
    c1 = guests.launch("cf1", mem="256M", workload="toucher", alloc_mib=64, ws=64)
    c2 = guests.launch("cf2", mem="256M")
    guests.wait_event(c1, "toucher_filled", timeout_s=60)
    ksm_before = ksm_snapshot()
    vms = {"cf1": {"socket": c1["socket"], **LIMITS}, "cf2": {"socket": c2["socket"], **LIMITS}}
    host = {"managed": "1G", "sample_period_s": 2, "share_interval_s": 1}

    # A clean run leaves real files to corrupt.
    hv = start_hv(tmp_path, host, vms)
    try:
        for n in vms:
            hv.wait_event("sample", 30, vm=n)
        hv.wait_event("share", 30)
    finally:
        assert hv.stop() == 0, hv.stderr()
    est1, est2 = (state_dir / "vms" / n / "estimator.json" for n in vms)
    pages1, pages2 = (page_state.state_path(n) for n in vms)
    daemon = state_dir / "daemon"
    est1.write_text(est1.read_text()[: len(est1.read_text()) // 2])  # truncated
    bad = json.loads(est2.read_text())
    bad["estimator"]["slow"] = float("nan")
    est2.write_text(json.dumps(bad))  # NaN: valid JSON to Python, not a fraction
    os.truncate(pages1, 1000)
    with open(pages2, "r+b") as f:
        f.write(b"GARBAGE!")
    (daemon / "guard.json").write_text('{"hv_pid": "x", "paused": ["cf1"], "ksm_raised": 7}')
    (state_dir / "ksm-saved.json").write_text('{"run": ')
    # A status of a "daemon" whose pid is alive (this test) but started at another time.
    (daemon / "status.json").write_text(json.dumps({
        "pid": os.getpid(), "started": 1, "time": time.time(), "state": "low",
        "free_bytes": 0, "pool_bytes": 0, "vms": {"cf1": {"socket": c1["socket"]}}}))

    # No daemon: `hv status` asks QEMU, and a held QMP socket is busy, not "managed".
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(c1["socket"])
    try:
        shown = hv_cli("status", "cf1")
    finally:
        holder.close()
    assert shown.returncode != 0 and len(shown.stderr.strip().splitlines()) == 1, shown.stderr
    assert "busy" in shown.stderr or "greet" in shown.stderr, shown.stderr
    assert "hv run" not in shown.stderr, shown.stderr

    t0 = time.time()
    hv = start_hv(tmp_path, host, vms)
    try:
        started = wait_started(hv, t0)
        for n in vms:
            wait_for(lambda: [e for e in hv.events("sample", vm=n) if e["ts"] > started],
                     30, f"a new sample of {n}")
        wait_for(lambda: [e for e in hv.events("share") if e["ts"] > started], 30,
                 "a sharing round")
        assert not [e for e in hv.events("estimator_loaded") if e["ts"] >= started]
        err = hv.stderr()
        for path in (est1, est2):
            lines = [ln for ln in err.splitlines() if str(path) in ln]
            assert len(lines) == 1 and "ignoring unusable" in lines[0], err
        replaced = [e for e in hv.events("page_state_replaced") if e["ts"] >= started]
        assert sorted(e["error"].split(":")[0] for e in replaced) == sorted(
            str(p) for p in (pages1, pages2)), replaced
        for path in (pages1, pages2):
            lines = [ln for ln in err.splitlines() if str(path) in ln]
            assert len(lines) == 1 and "started its page state afresh" in lines[0], err
        for n in vms:
            assert hv.last_tick(n)["run_state"] == "running"
    finally:
        rc = hv.stop()
    assert rc == 0, hv.stderr()
    assert_no_traceback(hv)
    for path in (est1, est2):
        WorkingSetEstimator.from_dict(json.loads(path.read_text())["estimator"])
    for path in (pages1, pages2):
        page_state.open_state(path, writable=False).close()
    assert not (daemon / "guard.json").exists() and not (daemon / "status.json").exists()
    assert ksm_snapshot() == ksm_before and not (state_dir / "ksm-saved.json").exists()
    for g in (c1, c2):
        assert qmp_status(g["socket"]) == "running"


def test_two_daemons(guests, host_swap, state_dir, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Two daemons against one state directory, and against two.

    Promise: a second `hv run` on the same state directory refuses in one line, at once,
    and changes nothing (the first keeps its lock, guard, status and VMs; its VM is not
    touched).  On two state directories both run and manage their own VMs; only one
    governs KSM at a time (the other says so once), and KSM's tunables are as before
    once both stopped, whichever stops first.
    """
    d1 = guests.launch("td1", mem="256M")
    d2 = guests.launch("td2", mem="256M")
    ksm_before = ksm_snapshot()
    host = {"managed": "1G", "share_interval_s": 1}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    a = start_hv(tmp_path / "a", host, {"td1": {"socket": d1["socket"], **LIMITS}})
    try:
        a.wait_event("ksm_raised", 30)
        ticks_after(a, "td1", 0, count=2)
        guard = (state_dir / "daemon" / "guard.json").read_text()
        config_b = write_config(tmp_path / "b" / "hv.toml", {**HOST, **host},
                                {"td2": {"socket": d2["socket"], **LIMITS}})
        started = time.monotonic()
        refused = hv_cli("run", "--config", str(config_b), "--log", str(tmp_path / "b.jsonl"))
        assert refused.returncode != 0
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "another hv run" in lines[0], refused.stderr
        assert time.monotonic() - started < 10
        assert not (tmp_path / "b.jsonl").exists()
        assert (state_dir / "daemon" / "guard.json").read_text() == guard
        ticks_after(a, "td1", time.time(), count=2)
        assert json.loads((state_dir / "daemon" / "status.json").read_text())["pid"] == a.proc.pid

        # Against a second state directory: both run.
        other = tmp_path / "state2"
        monkeypatch.setenv("HV_STATE_DIR", str(other))
        b = start_hv(tmp_path / "b", host, {"td2": {"socket": d2["socket"], **LIMITS}})
        try:
            ticks_after(b, "td2", 0, count=3)
            ticks_after(a, "td1", time.time(), count=2)
            b_start = b.wait_event("start", 10)
            assert b_start["pid"] == b.proc.pid
            said = b.events("ksm_unavailable")
            assert len(said) == 1 and "another hv run" in said[0]["error"], b.events()
        finally:
            rc_a = a.stop()  # the first to govern KSM stops first
            rc_b = b.stop()
    finally:
        a.close()
    assert rc_a == 0 and rc_b == 0, (a.stderr(), b.stderr())
    assert_no_traceback(a)
    assert_no_traceback(b)
    assert_ksm_restored(a.log, state_dir, ksm_before)
    assert ksm_snapshot() == ksm_before
    for d in (state_dir, other):
        assert not (d / "daemon" / "guard.json").exists() and not (d / "ksm-saved.json").exists()
    assert qmp_status(d1["socket"]) == "running" and qmp_status(d2["socket"]) == "running"
