"""`hv run` SIGKILLed at 20 random moments of a run, each followed by a restart."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time

import pytest

from hv.eventlog import read_events
from hv.policy import WorkingSetEstimator
from tests.conftest import wait_for
from tests.faults.runs import HOST, assert_no_traceback, ticks_after, wait_started
from tests.functional.hvrun import (
    HvRun,
    guardian_pids,
    ksm_snapshot,
    qmp_status,
    write_config,
)

pytestmark = pytest.mark.guest

KILLS = 20

# Each kill comes this long (uniform) after hv was spawned: from its Python start-up,
# through attaching and its first ticks, to pausing, ballooning, page-out, sampling
# (2 s periods) and sharing rounds (every second, budget permitting).
KILL_AFTER_S = (0.2, 4.0)


def test_hv_killed_20_times(guests, host_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    """hv SIGKILLed at 20 random moments of a run (the forced state drawn at random each
    time, so the kills land amid pauses, balloons, page-outs, samples and KSM changes),
    each followed at once by a restart.

    Promise: every restart starts (the dead hv's lock, guard file, status and half-done
    work never refuse it); afterwards no guest is left paused, KSM's tunables are as
    before the first run (no saved record left), no guard file or guardian outlives
    its hv, and the working-set estimates on disk load, are finite and in [0, 1].
    """
    seed = int(os.environ.get("HV_FAULT_SEED", time.time_ns() % 2**32))
    print(f"HV_FAULT_SEED={seed}")
    rng = random.Random(seed)
    busy = guests.launch("hk1", mem="256M", workload="toucher", alloc_mib=100, ws="100:3,20:3")
    idle = guests.launch("hk2", mem="256M", workload="hog", hog_mib=120, hog_hold_s=1)
    guests.wait_event(busy, "toucher_filled", timeout_s=60)
    guests.wait_event(idle, "hog_freed", timeout_s=60)
    ksm_before = ksm_snapshot()
    log = tmp_path / "events.jsonl"
    force = tmp_path / "force"
    config = write_config(tmp_path / "hv.toml", {
        **HOST, "managed": "400M", "sample_period_s": 2, "share_interval_s": 1}, {
        "hk1": {"socket": busy["socket"], "min": "96M", "max": "256M", "shares": 50},
        "hk2": {"socket": idle["socket"], "min": "128M", "max": "256M"}})

    landed: list[str] = []  # what each killed run had done last, for the record
    for i in range(KILLS):
        state = rng.choice(["high", "soft", "hard", "low"])
        force.write_text(state)
        since = time.time()
        hv = HvRun(config, log, "--force-state-file", str(force))
        try:
            # The kill's moment: random by design, not a wait standing in for a condition.
            time.sleep(rng.uniform(*KILL_AFTER_S))
            hv.check_alive()
            hv.proc.send_signal(signal.SIGKILL)
            hv.proc.wait(10)
        finally:
            hv.close()
        done = [e["event"] for e in read_events(log) if e["ts"] >= since]
        landed.append(f"{state}:{done[-1] if done else 'before start'}")
        errors = [ln for ln in hv.stderr().splitlines() if "error" in ln]
        assert not errors, f"run {i + 1} refused: {errors}"
        assert_no_traceback(hv)
    print("kills landed after: " + ", ".join(landed))

    # A last run, stopped cleanly: both VMs ticked, running and not paused by hv.
    force.write_text("high")
    t0 = time.time()
    hv = HvRun(config, log, "--force-state-file", str(force))
    try:
        started = wait_started(hv, t0)
        for name in ("hk1", "hk2"):
            wait_for(lambda: [t for t in ticks_after(hv, name, started, count=1)
                              if t["run_state"] == "running" and not t["paused_by_hv"]],
                     60, f"{name} running, not paused by hv")
            wait_for(lambda: [e for e in hv.events("sample", vm=name) if e["ts"] > started],
                     30, f"a sample of {name}")  # an estimate saved by this run too
    finally:
        rc = hv.stop()
    assert rc == 0, hv.stderr()
    assert_no_traceback(hv)
    assert "ignoring unusable" not in hv.stderr(), hv.stderr()
    wait_for(lambda: not guardian_pids(state_dir), 30, "every guardian to exit")

    assert qmp_status(busy["socket"]) == "running" and qmp_status(idle["socket"]) == "running"
    assert ksm_snapshot() == ksm_before
    assert not (state_dir / "ksm-saved.json").exists()
    assert not (state_dir / "daemon" / "guard.json").exists()
    assert len(list(read_events(log, "start"))) >= KILLS // 2  # most kills came after start
    for name in ("hk1", "hk2"):
        est_file = state_dir / "vms" / name / "estimator.json"
        est = WorkingSetEstimator.from_dict(json.loads(est_file.read_text())["estimator"])
        assert est.periods >= 1, est
        for value in (est.slow, est.fast, est.current, est.active_fraction):
            assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, est
