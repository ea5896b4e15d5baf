"""Event-log rotation, private files, the opt-out rule and the ``ksm`` key (no guests)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hv import paths
from hv.errors import ConfigError, UsageError
from hv.eventlog import MIN_MAX_BYTES, EventLog, log_files, read_events
from hv.policy.config import parse_config
from hv.sharing import optout


def test_event_log_rotates_and_reads_as_one(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    pad = "x" * 1000
    with EventLog(path, max_bytes=MIN_MAX_BYTES, keep=2) as log:
        for i in range(300):  # ~1 KiB each: ~300 KiB, so past 64 KiB several times
            log.write("tick", n=i, pad=pad)
    files = log_files(path)
    assert [f.name for f in files] == ["events.jsonl.2", "events.jsonl.1", "events.jsonl"]
    assert not (tmp_path / "logs" / "events.jsonl.3").exists()
    for f in files:
        assert f.stat().st_size <= MIN_MAX_BYTES
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    got = [e["n"] for e in read_events(path, "tick")]
    # The newest lines, in order, none lost between files; the oldest rotated away.
    assert got == list(range(got[0], 300)) and 100 < len(got) < 300


def test_event_log_without_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, max_bytes=MIN_MAX_BYTES, keep=0) as log:
        for i in range(200):
            log.write("tick", n=i, pad="y" * 1000)
    assert log_files(path) == [path]
    assert [e["n"] for e in read_events(path)][-1] == 199


def test_event_log_limits() -> None:
    with pytest.raises(UsageError, match="below the minimum"):
        EventLog.check_limits(1024, 3)
    with pytest.raises(UsageError, match="0 or more"):
        EventLog.check_limits(MIN_MAX_BYTES, -1)


def test_private_dirs_and_files_whatever_the_umask(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # an older, looser state directory
    monkeypatch.setenv("HV_STATE_DIR", str(state))
    old = os.umask(0)
    try:
        paths.write_json_atomic(state / "a" / "b" / "x.json", {"k": 1})
        outside = tmp_path / "admin"
        outside.mkdir(mode=0o755)
        outside.chmod(0o755)
        EventLog(outside / "sub" / "events.jsonl").close()
    finally:
        os.umask(old)
    for d in (state, state / "a", state / "a" / "b"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((state / "a" / "b" / "x.json").stat().st_mode) == 0o600
    # A folder of the admin's is left as it is; what hv creates in it is private.
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755
    assert stat.S_IMODE((outside / "sub").stat().st_mode) == 0o700
    assert stat.S_IMODE((outside / "sub" / "events.jsonl").stat().st_mode) == 0o600


@pytest.mark.parametrize("config_ksm, admin, now, off_by_hv, want", [
    (True, None, True, False, None),      # nothing asked: left alone
    (False, None, True, False, False),    # ksm = false: out
    (True, False, True, False, False),    # hv share --opt-out: out
    (True, None, False, False, None),     # merge off by someone else: never turned on by hv
    (True, None, False, True, True),      # hv took it out (config changed back): back in
    (True, True, False, False, True),     # hv share --opt-in: back in
    (False, True, False, True, None),     # the config's ksm = false wins over --opt-in
    (False, None, False, True, None),     # out already
])
def test_opt_out_rule(config_ksm: bool, admin: bool | None, now: bool, off_by_hv: bool,
                      want: bool | None) -> None:
    assert optout.wanted(config_ksm, admin, now, off_by_hv) is want


def test_opt_out_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HV_STATE_DIR", str(tmp_path))
    assert optout.admin_choices() == {} and optout.record_mtime() is None
    optout.set_admin_choice("b", False)
    optout.set_admin_choice("a", True)
    assert optout.admin_choices() == {"a": True, "b": False}
    assert stat.S_IMODE(optout.record_path().stat().st_mode) == 0o600


def test_ksm_key_in_config() -> None:
    text = '[vm.a]\nmin = "128M"\nmax = "256M"\nksm = false\n[vm.b]\nmin = "128M"\nmax = "256M"\n'
    cfg = parse_config(text, "hv.toml", 8 << 30)
    assert [v.ksm for v in cfg.vms] == [False, True]
    with pytest.raises(ConfigError, match=r"vm.a.ksm: must be true or false, not string 'no'"):
        parse_config(text.replace("ksm = false", 'ksm = "no"'), "hv.toml", 8 << 30)
