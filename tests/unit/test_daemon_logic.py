"""Pure parts of the daemon, the sampler's refusal, the event log and the guard file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hv import sampler
from hv.host import swap as hv_swap
from hv.daemon import (
    SWAP_MAX_PAGES_PER_TICK,
    balloon_goal,
    hidden_estimate,
    host_free_bytes,
    parse_state,
    policy_active_fraction,
    swap_pages_for,
)
from hv.errors import UsageError
from hv.eventlog import EventLog, read_events
from hv.guardian import GuardFile
from hv.policy import MemState
from hv.qemu.vm import HEADROOM_BYTES, GuestStats, balloon_floor
from hv.units import MiB, PAGE_SIZE


def stats(total_mib: int | None, available_mib: int | None) -> GuestStats:
    return GuestStats(
        total_bytes=None if total_mib is None else total_mib * MiB,
        free_bytes=None,
        available_bytes=None if available_mib is None else available_mib * MiB,
        disk_caches_bytes=None, swap_in_pages=None, swap_out_pages=None,
        major_faults=None, minor_faults=None, age_s=1.0)


def test_parse_state() -> None:
    assert parse_state("hard") is MemState.HARD
    assert parse_state(" LOW\n") is MemState.LOW
    with pytest.raises(UsageError, match="unknown state 'panic'"):
        parse_state("panic")


def test_host_free_is_the_tighter_of_host_and_pool() -> None:
    assert host_free_bytes(10 * MiB, 500 * MiB, 100 * MiB) == 10 * MiB
    assert host_free_bytes(20_000 * MiB, 500 * MiB, 420 * MiB) == 80 * MiB
    assert host_free_bytes(20_000 * MiB, 500 * MiB, 600 * MiB) == 0


def test_policy_active_fraction_scales_to_the_allocation() -> None:
    # 50 % of 10,000 sampleable pages is 5,000 active pages of a 20,000-page allocation.
    assert policy_active_fraction(0.5, 10_000, 20_000 * PAGE_SIZE) == pytest.approx(0.25)
    assert policy_active_fraction(1.0, 0, 256 * MiB) == 1.0  # unmeasured: all active
    assert policy_active_fraction(0.9, 30_000, 20_000 * PAGE_SIZE) == 1.0  # clamped


def test_balloon_goal_never_below_what_the_guest_needs() -> None:
    ram = 256 * MiB
    # Plenty free in the guest: the target wins (above the floor).
    assert balloon_goal(150 * MiB, ram, stats(200, 170), 40 * MiB) == 150 * MiB
    # 146 MiB in use + 39 MiB reserved + headroom: the goal stays above it.
    goal = balloon_goal(100 * MiB, ram, stats(217, 71), 39 * MiB)
    assert goal == 39 * MiB + 146 * MiB + HEADROOM_BYTES
    # No statistics: the floor only; never above the VM's RAM.
    assert balloon_goal(10 * MiB, ram, stats(None, None), 0) == balloon_floor(ram)
    assert balloon_goal(300 * MiB, ram, stats(None, None), 0) == ram


def test_hidden_estimate_counts_only_settled_readings() -> None:
    s = stats(217, 100)
    assert hidden_estimate(None, 256 * MiB, None, s) is None           # first reading
    assert hidden_estimate(None, 256 * MiB, 256 * MiB, s) == 39 * MiB  # settled
    # The balloon moved since the last reading: a stale MemTotal would mislead.
    assert hidden_estimate(39 * MiB, 224 * MiB, 256 * MiB, s) == 39 * MiB
    # Settled but stale-looking smaller difference: the largest is kept.
    assert hidden_estimate(39 * MiB, 224 * MiB, 224 * MiB, s) == 39 * MiB


def test_swap_pages_for() -> None:
    assert swap_pages_for(100 * MiB, 98 * MiB) == 0       # within slack
    assert swap_pages_for(120 * MiB, 100 * MiB) == 20 * MiB // PAGE_SIZE
    assert swap_pages_for(1024 * MiB, 100 * MiB) == SWAP_MAX_PAGES_PER_TICK


def test_sampler_refuses_without_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hv_swap, "totals", lambda: (0, 0))
    with pytest.raises(sampler.SamplerUnavailable, match="no swap.*hv swap create"):
        sampler.check_can_sample()
    monkeypatch.setattr(hv_swap, "totals", lambda: (1 << 30, 0))
    with pytest.raises(sampler.SamplerUnavailable, match="full"):
        sampler.check_can_sample()
    monkeypatch.setattr(hv_swap, "totals", lambda: (1 << 30, 1 << 29))
    sampler.check_can_sample()


def test_sample_result_fraction() -> None:
    r = sampler.SampleResult(touched=30, sampled=120, dropped=80, sampleable=5000, present=7000)
    assert r.fraction == 0.25
    assert sampler.SampleResult(0, 0, 100, 100, 100).fraction is None


def test_event_log_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "log" / "events.jsonl"
    with EventLog(path) as log:
        log.write("tick", vm="a", target_bytes=1)
        log.write("pause", vm="a")
    with open(path, "a") as f:
        f.write('{"ts": 1, "event": "tick", "vm": "b"')  # torn last line
    assert [e["event"] for e in read_events(path)] == ["tick", "pause"]
    assert [e["vm"] for e in read_events(path, "tick")] == ["a"]
    assert list(read_events(tmp_path / "missing")) == []


def test_guard_file_round_trip(tmp_path: Path) -> None:
    g = GuardFile(tmp_path / "guard.json", hv_pid=42)
    assert g.empty
    g.paused["vm1"] = "/run/hv/vm1/qmp.sock"
    g.ksm_raised = True
    g.save()
    back = GuardFile.load(g.path)
    assert (back.hv_pid, back.paused, back.ksm_raised) == (42, {"vm1": "/run/hv/vm1/qmp.sock"}, True)
    assert GuardFile.load(tmp_path / "none.json").empty


def test_guardian_keeps_what_it_could_not_undo(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A VM the guardian cannot resume stays recorded for the next hv."""
    from hv.guardian import GuardFile, undo
    path = tmp_path / "guard.json"
    guard = GuardFile(path, hv_pid=1)
    guard.paused["ghost"] = str(tmp_path / "no-such.sock")
    guard.save()
    lines = undo(path)
    assert any("ghost: cannot resume" in line for line in lines)
    assert path.exists() and "ghost" in GuardFile.load(path).paused


def test_running_status_ignores_torn_or_foreign_snapshots(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os
    from hv.daemon import running_status, status_file
    monkeypatch.setenv("HV_STATE_DIR", str(tmp_path))
    status_file().parent.mkdir(parents=True)
    for text in ("{", "[]", '{"vms": {}}', '{"pid": "x", "vms": {}}'):
        status_file().write_text(text)
        assert running_status() is None
    status_file().write_text('{"pid": %d, "vms": {}}' % os.getpid())
    assert running_status() is not None


def test_ksm_restore_of_a_torn_record_is_one_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest
    from hv.errors import HostError
    from hv.host.ksm import Ksm
    from hv.host.sysfs import Sysfs
    saved = tmp_path / "ksm-saved.json"
    saved.write_text('{"run": ')
    with pytest.raises(HostError, match="cannot read KSM's saved settings"):
        Ksm(Sysfs(record_only=True), saved_file=saved).restore()
