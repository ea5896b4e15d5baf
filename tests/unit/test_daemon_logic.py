"""The daemon's state parsing and published status, the sampler's refusal, the event log and the guard file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hv import sampler
from hv.host import swap as hv_swap
from hv.daemon import parse_state
from hv.errors import UsageError
from hv.eventlog import EventLog, read_events
from hv.guardian import GuardFile
from hv.policy import MemState


def test_parse_state() -> None:
    assert parse_state("hard") is MemState.HARD
    assert parse_state(" LOW\n") is MemState.LOW
    with pytest.raises(UsageError, match="unknown state 'panic'"):
        parse_state("panic")


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


def test_event_log_counts_lines_lost_to_a_full_disk(tmp_path: Path) -> None:
    """A full disk costs lines, never the daemon: told once, then a log_gap line."""
    import os
    path = tmp_path / "events.jsonl"
    told: list[OSError] = []
    log = EventLog(path, on_error=told.append)
    log.write("kept")
    disk, log._fd = log._fd, os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    with open(path, "a") as f:
        f.write('{"ts": 1, "event": "to')  # the line the disk cut short
    for i in range(3):
        log.write("lost", i=i)
    os.close(log._fd)
    log._fd = disk
    log.write("after")
    log.close()
    assert len(told) == 1 and "No space" in str(told[0])
    events = list(read_events(path))
    assert [e["event"] for e in events] == ["kept", "log_gap", "after"]
    assert events[1]["lost"] == 3


@pytest.mark.parametrize("text", ['{"hv_pid": "x", "paused": ["vm1"]}', '[1, 2]',
                                  '{"paused": 3}', '{"hv_pid": 1, "pau'])
def test_guard_file_garbled_is_empty(tmp_path: Path, text: str) -> None:
    path = tmp_path / "guard.json"
    path.write_text(text)
    assert GuardFile.load(path).empty


def test_one_hv_governs_ksm() -> None:
    """The KSM claim is exclusive host-wide and goes with its holder."""
    import os
    from hv.daemon.sharing import claim_ksm
    from hv.errors import HostError
    fd = claim_ksm()
    try:
        with pytest.raises(HostError, match="another hv run governs KSM"):
            claim_ksm()
    finally:
        os.close(fd)
    os.close(claim_ksm())


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
    # The same pid with another start time is another process (pid reuse).
    status_file().write_text('{"pid": %d, "started": 1, "vms": {}}' % os.getpid())
    assert running_status() is None
    from hv.daemon.status import publish
    publish(state="high", free_bytes=1, pool_bytes=2, vms={})
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
