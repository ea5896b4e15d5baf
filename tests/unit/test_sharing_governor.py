"""The KSM governor's pure policy, and the exact transcript of what it writes to KSM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hv.host.ksm import Ksm
from hv.host.sysfs import Sysfs
from hv.sharing.governor import Governor, Mode, Observation, Params, decide
from hv.sharing.index import SharingIndex, VmSharing

P = Params()


def test_large_backlog_scans_all_present_pages_in_a_fast_pass() -> None:
    d = decide(Observation(present_pages=120_000, backlog_pages=60_000))
    assert d.mode is Mode.CONVERGE
    assert d.setting.sleep_millisecs == P.sleep_millisecs
    assert d.setting.pages_per_s == pytest.approx(120_000 / P.fast_pass_s, rel=0.01)


def test_rate_falls_as_the_backlog_shrinks_then_idles() -> None:
    rates = [decide(Observation(120_000, b)).setting.pages_per_s
             for b in (60_000, 12_000, 6_000, 3_000)]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
    idle = decide(Observation(120_000, 1_000))
    assert idle.mode is Mode.IDLE
    assert idle.setting.pages_per_s <= 200  # a trickle: far below 1% of a core


def test_hysteresis_keeps_idle_until_twice_the_threshold() -> None:
    threshold = P.idle_backlog_fraction * 120_000
    assert decide(Observation(120_000, int(threshold * 1.5), Mode.IDLE)).mode is Mode.IDLE
    assert decide(Observation(120_000, int(threshold * 1.5), Mode.CONVERGE)).mode is Mode.CONVERGE
    assert decide(Observation(120_000, int(threshold * 2.5), Mode.IDLE)).mode is Mode.CONVERGE


def test_small_vms_idle_below_the_absolute_floor() -> None:
    assert decide(Observation(1_000, 400)).mode is Mode.IDLE


def test_cpu_budget_caps_the_rate() -> None:
    slow = decide(Observation(1_000_000, 500_000, ksmd_cpu_s_per_page=20e-6))
    assert slow.setting.pages_per_s <= P.cpu_budget_cores / 20e-6 * 1.01
    assert "CPU budget" in slow.reason


def test_batch_is_bounded() -> None:
    assert decide(Observation(10**9, 10**9)).setting.pages_to_scan == P.max_pages_to_scan
    assert decide(Observation(2_000, 1_500)).setting.pages_to_scan == P.min_pages_to_scan


def _fake_ksm(tmp_path: Path) -> Ksm:
    root = tmp_path / "ksm"
    root.mkdir()
    values = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "use_zero_pages": "0",
              "advisor_mode": "[none] scan-time", "pages_sharing": "0", "pages_scanned": "0"}
    for name, value in values.items():
        (root / name).write_text(value + "\n")
    return Ksm(Sysfs(), root=str(root), saved_file=tmp_path / "saved.json")


def _index(present: int, potential: int, realized: int) -> SharingIndex:
    row = VmSharing("a", present, present, 0, 0, 0, 0, 0, 0, 0, 0, None, None, None,
                    0.0, 0.0, 0.0, None)
    return SharingIndex((row,), 0, 0, potential, realized, realized)


def test_governor_transcript_and_restore(tmp_path: Path) -> None:
    ksm = _fake_ksm(tmp_path)
    gov = Governor(ksm)
    gov.start()
    root = ksm.root
    first = [(os.path.basename(p), v) for p, v in ksm.sysfs.writes]
    assert first[-1] == ("run", "1") and ("use_zero_pages", "1") in first
    ksm.sysfs.writes.clear()
    gov.step(_index(120_000, 60_000, 0))
    fast = dict((os.path.basename(p), v) for p, v in ksm.sysfs.writes)
    assert int(fast["pages_to_scan"]) == 1600  # 120 K pages every 1.5 s, in 20 ms batches
    ksm.sysfs.writes.clear()
    gov.step(_index(120_000, 60_000, 0))
    assert ksm.sysfs.writes == []  # no change, no write
    (Path(root) / "pages_to_scan").write_text("5000\n")  # another writer
    gov.step(_index(120_000, 60_000, 0))
    assert gov.overridden == 1 and (Path(root) / "pages_to_scan").read_text().strip() == "1600"
    gov.step(_index(120_000, 60_000, 59_900))
    assert gov.mode is Mode.IDLE and gov.samples[-1].sleep_millisecs == P.idle_sleep_millisecs
    gov.stop()
    assert (Path(root) / "run").read_text().strip() == "0"
    assert (Path(root) / "pages_to_scan").read_text().strip() == "100"
    assert (Path(root) / "use_zero_pages").read_text().strip() == "0"
    assert not (tmp_path / "saved.json").exists()


def test_a_vm_leaving_sharing_gets_one_pass_then_idle(tmp_path: Path) -> None:
    """After an opt-out KSM still counts the VM's pages until ksmd walks past them: the
    governor runs one sweep (two more full scans) at a pass per sweep_pass_s, then idles."""
    ksm = _fake_ksm(tmp_path)
    (Path(ksm.root) / "full_scans").write_text("7\n")
    gov = Governor(ksm)
    gov.start()
    merged = _index(600_000, 300_000, 299_900)
    assert gov.step(merged).mode is Mode.IDLE
    gov.sweep()
    d = gov.step(merged)
    assert d.mode is Mode.CONVERGE and "left sharing" in d.reason
    assert d.setting.pages_per_s == pytest.approx(600_000 / P.sweep_pass_s, rel=0.01)
    (Path(ksm.root) / "full_scans").write_text("8\n")
    assert gov.step(merged).mode is Mode.CONVERGE  # the pass under way does not count
    (Path(ksm.root) / "full_scans").write_text("9\n")
    assert gov.step(merged).mode is Mode.IDLE and gov.sweep_until is None
    gov.stop()


def test_the_sweep_waits_for_the_backlog_of_the_round_under_way(tmp_path: Path) -> None:
    """A scan round under way when the VM left still counts its unmerged pages as
    backlog: ksmd converges first, however many full scans that takes, and the sweep's
    one pass comes once the backlog is gone (it was lost when counted from the request)."""
    ksm = _fake_ksm(tmp_path)
    (Path(ksm.root) / "full_scans").write_text("7\n")
    gov = Governor(ksm)
    gov.start()
    gov.sweep()
    d = gov.step(_index(600_000, 300_000, 200_000))  # the left VM's pages, unmerged
    assert d.mode is Mode.CONVERGE and not d.sweep and "backlog" in d.reason
    (Path(ksm.root) / "full_scans").write_text("12\n")
    d = gov.step(_index(400_000, 200_000, 199_900))
    assert d.sweep and "left sharing" in d.reason and gov.sweep_until == 14
    (Path(ksm.root) / "full_scans").write_text("14\n")
    assert gov.step(_index(400_000, 200_000, 199_900)).mode is Mode.IDLE
    gov.stop()
