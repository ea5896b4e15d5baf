"""hv bench tax's pure parts: the lock level, throughput, settled allocations, the shape."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from hv.bench import tax
from hv.bench.daemon import toml_table
from hv.errors import UsageError
from hv.policy import compute_targets
from hv.policy.config import parse_config
from hv.policy.reclaim import pool_bytes
from hv.policy.shares import VMDemand
from hv.units import MiB

IDLE, ACTIVE = "tax-idle", "tax-active"


def args(**over: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    tax.add_arguments(p)
    ns = p.parse_args([])
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


def test_defaults_parse_and_name_the_guests() -> None:
    cfg = tax.config_from_args(args())
    assert (cfg.idle_name, cfg.active_name) == (IDLE, ACTIVE)
    assert cfg.mem_bytes == 1664 * MiB and cfg.tax_rate == 0.75 and cfg.half_s == 180


@pytest.mark.parametrize("over, words", [
    ({"ws": 0}, "--ws must be at least"),
    ({"ws": 1600}, "needs guests of at least 1728 MiB"),
    ({"idle_mib": 5000}, "--idle-mib"),
    ({"pool": 500}, "--pool must lie between"),
    ({"pool": 4000}, "--pool must lie between"),
    ({"tax": 0.0}, "--tax must be above 0"),
    ({"tax": 1.0}, "--tax must be above 0"),
    ({"tax": float("nan")}, "--tax must be above 0"),
    ({"half": 25.0}, "three sampling periods"),
    ({"period": -1.0}, "--period must be a positive"),
    ({"min": "2G"}, "--min must be above 0"),
])
def test_bad_input_is_one_usage_error(over: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        tax.config_from_args(args(**over))


def test_lock_level_makes_hvs_pool_the_asked_one() -> None:
    goal, held = 1597 * MiB, 2400 * MiB
    level = tax.lock_level_bytes(1400 * MiB, held, goal)
    assert level == 597 * MiB
    # hv's own rule, fed the MemAvailable the locker aims for, gives back the pool.
    assert pool_bytes(held, level, goal, 10**12) == 1400 * MiB


def test_the_defaults_split_the_pool_evenly_without_tax_and_favour_the_active_vm_with_it() -> None:
    """hv's revocation on the run's default sizes: why the defaults show the paper's shape."""
    cfg = tax.TaxConfig()
    pool = cfg.pool_mib * MiB
    # As measured: the idle VM at its tax-0 share with nothing active, the toucher
    # holding its whole working set and more (hv could not page it down).
    idle = VMDemand(IDLE, 1000, cfg.min_bytes, cfg.mem_bytes, pool // 2, 0.0)
    active = VMDemand(ACTIVE, 1000, cfg.min_bytes, cfg.mem_bytes, 1420 * MiB, 0.95)
    even = compute_targets([idle, active], pool, 0.0)
    assert even[IDLE] == even[ACTIVE] == pool // 2
    taxed = compute_targets([idle, active], pool, cfg.tax_rate)
    # With the tax the active VM's target covers all it holds: hv stops paging it out.
    assert taxed[ACTIVE] >= 1420 * MiB and cfg.min_bytes <= taxed[IDLE] <= pool // 4


def test_config_file_reloads_with_the_new_tax() -> None:
    vms = {IDLE: {"socket": "/run/x.sock", "min": 256 * MiB, "max": 1664 * MiB, "shares": 1000}}
    for rate in (0.0, 0.75):
        text = "\n".join(toml_table("host", {"tax_rate": rate, "sample_period_s": 10.0})
                         + [""] + toml_table(f"vm.{IDLE}", vms[IDLE])) + "\n"
        cfg = parse_config(text, "hv.toml", 24 << 30)
        assert cfg.host.tax_rate == rate and cfg.host.sample_period_s == 10.0
        assert cfg.vms[0].socket == "/run/x.sock" and cfg.vms[0].min_bytes == 256 * MiB


def test_rates_use_the_guests_clock_over_a_window() -> None:
    # 2 passes/s for 20 s, then 0.5 passes/s; the host saw each line 0.3 s late.
    passes, n = [], 0
    for t in range(41):
        passes.append((t + 0.3, float(t), n))
        n += 2 if t < 20 else 1 if t % 2 else 0
    got = dict(tax.rates(passes, window_s=10))
    assert got[10.3] == pytest.approx(2.0)
    assert got[40.3] == pytest.approx(0.5)
    assert 0 not in [t for t, _ in tax.rates(passes)]  # nothing before a window


def tick(t: float, vm: str, target: int, resident: int) -> dict[str, Any]:
    return {"t_s": t, "vm": vm, "state": "soft", "target_bytes": target * MiB,
            "resident_bytes": resident * MiB, "balloon_bytes": 1664 * MiB, "swap_bytes": 0,
            "active": 0.9 if vm == ACTIVE else 0.05}


def result(active_after: int, switch_s: float = 100.0) -> tax.TaxResult:
    ticks = []
    for t in range(0, 200, 2):
        before = t < switch_s
        ticks.append(tick(t, IDLE, 700 if before else 300, 700 if before else 320))
        ticks.append(tick(t, ACTIVE, 700 if before else 1100, 700 if before else active_after))
    passes = [(float(t), float(t), t * (1 if t < switch_s else 3)) for t in range(200)]
    return tax.TaxResult(tax.report.jsonable(tax.TaxConfig()), 1e9, switch_s, 200.0, {},
                         ticks, [(0.0, "soft")], passes)


def test_memory_moved_is_the_shape() -> None:
    res = result(active_after=1080)
    s = tax.analyse(res, ACTIVE, IDLE)
    assert s["before"]["active_resident_mib"] == 700 and s["after"]["active_resident_mib"] == 1080
    assert s["before"]["idle_target_mib"] == 700 and s["after"]["idle_target_mib"] == 300
    assert s["active_resident_gain_mib"] == 380 and s["idle_resident_gain_mib"] == -380
    assert s["before"]["passes_per_s"] == pytest.approx(1.0)
    assert s["after"]["passes_per_s"] == pytest.approx(3.0)
    assert s["throughput_ratio"] == 3.0
    assert s["active_target_gain_mib"] == 400
    assert s["moved"] and s["misses"] == []
    res.summary = s
    assert res.complete
    text = tax.format_result(res)
    assert "memory moved to the active VM: its target +400.0 MiB, resident +380.0 MiB" in text
    assert "x3.0" in text


def test_an_active_vm_that_held_its_memory_at_tax_0_still_counts_if_it_keeps_it() -> None:
    # hv could not take the toucher down to its target (it faults pages straight back):
    # its resident memory does not rise, but its target does and the idle VM gave memory.
    res = result(active_after=700)
    s = tax.analyse(res, ACTIVE, IDLE)
    assert s["active_resident_gain_mib"] == 0 and s["moved"]


@pytest.mark.parametrize("change, words", [
    ({"active_target": 700 + tax.MOVE_MIB - 1}, "allocation (hv's target) changed by +63.0 MiB"),
    ({"idle_resident": 700 - tax.MOVE_MIB + 1}, "nothing was taken from it"),
    ({"active_resident": 700 - tax.KEEP_SLACK_MIB - 10}, "resident memory fell by 26.0 MiB"),
])
def test_each_part_of_the_shape_can_miss_and_says_why(change: dict[str, int], words: str) -> None:
    res = result(active_after=1080)
    for t in res.ticks:
        if t["t_s"] >= res.switch_s:
            for what, mib in change.items():
                role, key = what.split("_")
                if t["vm"] == (ACTIVE if role == "active" else IDLE):
                    t[f"{key}_bytes"] = mib * MiB
    res.summary = tax.analyse(res, ACTIVE, IDLE)
    assert not res.complete
    assert len(res.summary["misses"]) == 1 and words in res.summary["misses"][0]
    assert tax.format_result(res).splitlines()[-1].startswith("MISSED:")


def test_relevel_only_when_the_pool_is_off_by_more_than_the_tolerance() -> None:
    total = 24 * 1024 * MiB
    want = 1800 * MiB
    assert tax.relevel_pct(want + tax.POOL_TOLERANCE_BYTES, 700 * MiB, want, total) is None
    # hv's pool 300 MiB short: the locker gives back 300 MiB (MemAvailable 300 MiB higher).
    pct = tax.relevel_pct(want - 300 * MiB, 700 * MiB, want, total)
    assert pct == pytest.approx(100 * 1000 / (24 * 1024))
    # Never aims below the floor that keeps hv out of its low state.
    assert tax.relevel_pct(want + 600 * MiB, 400 * MiB, want, total) == tax.LOWEST_LEVEL_PCT


def test_settled_windows_are_the_second_half_of_each_half() -> None:
    # A transient right after the switch (t in [100, 150)) does not count.
    res = result(active_after=1100)
    for t in res.ticks:
        if t["vm"] == ACTIVE and 100 <= t["t_s"] < 150:
            t["resident_bytes"] = 10 * MiB
    s = tax.analyse(res, ACTIVE, IDLE)
    assert s["after"]["active_resident_mib"] == 1100


def test_plot_is_written(tmp_path: Path) -> None:
    res = result(active_after=1080)
    res.summary = tax.analyse(res, ACTIVE, IDLE)
    res.plot = tmp_path / "tax.png"
    tax.save_plot(res)
    assert res.plot.stat().st_size > 10_000
