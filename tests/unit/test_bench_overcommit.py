"""hv bench overcommit's burst sizing, analysis and report (pure), on synthetic runs."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import pytest

from hv.bench import overcommit
from hv.bench.overcommit import OvercommitResult, analyse, burst_level_bytes, oom_kills
from hv.bench.overcommit_report import GRACE_S, phase_rate
from hv.errors import UsageError
from hv.units import GiB, MiB

NAMES = ("oc-a", "oc-web")
TOTAL = 24 * GiB
LOW = TOTAL // 100


def parse(*argv: str) -> overcommit.OvercommitConfig:
    p = argparse.ArgumentParser()
    overcommit.add_arguments(p)
    return overcommit.config_from_args(p.parse_args(list(argv)))


@pytest.mark.parametrize("argv", [["--minutes", "0.5"], ["--minutes", "nan"], ["--min", "0"],
                                  ["--min", "800M"], ["--period", "inf"],
                                  ["--minutes", "2", "--period", "10"], ["--prefix", "a/b"],
                                  ["--series", "hv,foo"], ["--series", "hv,hv"], ["--series", ""],
                                  ["--scale", "0.1"], ["--scale", "2"],
                                  ["--scale", "0.25", "--min", "200M"]])
def test_bad_input_is_one_usage_error(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(*argv)


def test_defaults_and_scale() -> None:
    cfg = parse()
    assert (cfg.minutes, cfg.series, cfg.scale) == (3.0, ("hv", "balloon", "none"), 1.0)
    small = parse("--scale", "0.5", "--series", "none,hv")
    assert small.series == ("none", "hv")
    plans = {p.name: p for p in overcommit._plans(small)}
    assert plans["oc-web"].mem_bytes == 512 * MiB
    assert dict(plans["oc-web"].params)["ws"] == "250:60,75:60"
    assert dict(plans["oc-idle"].params) == {"hog_mib": "300", "hog_hold_s": "1"}


GOAL = TOTAL * 0.065  # hv's free goal: high 6 % + hysteresis 0.5 %


@pytest.mark.parametrize("nominal_pct,entry_pct,above_mib,want_pct,covered", [
    # Plenty above the mins: the nominal level, covered.
    (3.0, 4.0, 3000, 3.0, True),
    # Less: the level rises until the deficit is 75 % of what they hold above min.
    (1.5, 2.0, 1600, None, True),
    # Too little to cover even at the state's edge: the state wins, not covered.
    (0.8, 1.0, 500, 0.8, False),
    (3.0, 4.0, 100, 3.8, False),
])
def test_burst_level_covers_the_deficit_or_says_it_cannot(
        nominal_pct: float, entry_pct: float, above_mib: int, want_pct: float | None,
        covered: bool) -> None:
    level, ok = burst_level_bytes(TOTAL * nominal_pct / 100, TOTAL * entry_pct / 100, GOAL,
                                  above_mib * MiB, TOTAL)
    assert ok is covered
    assert level < TOTAL * entry_pct / 100, "the burst still reaches its state"
    if want_pct is None:
        assert level == pytest.approx(GOAL - 0.75 * above_mib * MiB, abs=1)
        assert level > TOTAL * nominal_pct / 100
    else:
        assert level == pytest.approx(TOTAL * want_pct / 100, abs=1)


def test_oom_kills_counts_kills_not_lines() -> None:
    one = ("[ 5.1] toucher invoked oom-killer: gfp_mask=0x140cca\n"
           "[ 5.2] oom-kill:constraint=CONSTRAINT_NONE,task=toucher,pid=80\n"
           "[ 5.2] Out of memory: Killed process 80 (toucher)\n")
    assert oom_kills("hv-guest: event=ready\n") == 0
    assert oom_kills(one) == 1
    assert oom_kills(one + one) == 2
    assert oom_kills("Out of memory: Killed process 9 (hog)\n") == 1


# -- a synthetic run: before 0-60, soft 60-180, low 180-300, released 300-420 ----------
def phases() -> list[dict[str, Any]]:
    return [{"phase": "before", "level_pct": None, "start_s": 0.0, "end_s": 60.0, "locked_bytes": 0},
            {"phase": "soft", "level_pct": 3.0, "start_s": 60.0, "end_s": 180.0,
             "locked_bytes": 20 * GiB, "above_min_bytes": 2 * GiB, "covered": True},
            {"phase": "low", "level_pct": 0.8, "start_s": 180.0, "end_s": 300.0,
             "locked_bytes": 21 * GiB, "above_min_bytes": GiB, "covered": False},
            {"phase": "released", "level_pct": None, "start_s": 300.0, "end_s": 420.0,
             "locked_bytes": 0}]


def samples(free_mib: dict[float, int], resident_mib: dict[float, int],
            web_rate: float = 2.0) -> list[dict[str, Any]]:
    """Every 2 s; free, resident (split over the VMs) step at the given times; the web
    toucher runs at ``web_rate`` passes/s before 60 s and half that after."""
    out = []
    passes = 0.0
    for i in range(211):
        t = 2.0 * i
        free = [v for k, v in sorted(free_mib.items()) if k <= t][-1]
        res = [v for k, v in sorted(resident_mib.items()) if k <= t][-1]
        out.append({"t_s": t, "free_bytes": free * MiB,
                    "vms": {n: [res * MiB // 2, 100 * MiB] for n in NAMES},
                    "passes": {"oc-web": int(passes), "oc-a": None}})
        passes += 2 * (web_rate if t < 60 else web_rate / 2)
    return out


def ticks(target_mib: dict[float, int], paused_last: bool = False) -> list[dict[str, Any]]:
    out = []
    last = max(target_mib)
    for t in sorted(target_mib):
        for n in NAMES:
            out.append({"t_s": t, "vm": n, "resident_bytes": 500 * MiB,
                        "target_bytes": target_mib[t] * MiB // 2, "swap_bytes": 0,
                        "balloon_bytes": 512 * MiB, "free_bytes": 900 * MiB,
                        "paused_by_hv": paused_last and t == last and n == "oc-web"})
    return out


GOOD_FREE = {0: 3000, 60: 700, 70: 1200, 180: 190, 194: 400, 300: 3000}
GOOD_RESIDENT = {0: 1000, 100: 800, 250: 600, 310: 700}
GOOD_TARGET = {50.0: 1024, 170.0: 780, 290.0: 580, 410.0: 1024}
GOOD_STATES = [(61.0, "soft"), (150.0, "high"), (181.0, "low"), (200.0, "hard"), (280.0, "soft"),
               (320.0, "high")]


def config() -> dict[str, Any]:
    return {"vms": {n: {"mib": 512, "shares": 1000, "workload": "toucher"} for n in NAMES},
            "active": ["oc-web"], "mem_total_bytes": TOTAL,
            "thresholds_pct": {"high_pct": 6.0, "soft_pct": 4.0, "hard_pct": 2.0, "low_pct": 1.0}}


def series(free: dict[float, int], target: dict[float, int], states: list[tuple[float, str]],
           paused_last: bool = False, oom: int = 0, hv: bool = True) -> dict[str, Any]:
    return {"reclaim": "balloon+swap" if hv else None, "phases": phases(),
            "samples": samples(free, GOOD_RESIDENT), "ticks": ticks(target, paused_last) if hv else [],
            "states": states if hv else [], "actions": {},
            "oom_kills": {"oc-web": oom, "oc-a": 0}}


def test_a_run_that_holds_free_memory_and_gives_back_holds_the_shape(tmp_path: Path) -> None:
    # The none baseline dips under low and kills a guest: reported, not judged.
    r = OvercommitResult(config(), {
        "hv": series(GOOD_FREE, GOOD_TARGET, GOOD_STATES),
        "none": series({**GOOD_FREE, 250: 100}, GOOD_TARGET, [], oom=1, hv=False)})
    s = analyse(r)
    assert s["misses"] == []
    hv, none = s["series"]["hv"], s["series"]["none"]
    # 180-195 is in the low burst's grace: 190 MiB there is not judged.
    assert hv["held"] == {"min_free_mib": 400.0, "min_free_at_s": 196.0, "below_low_s": 0.0,
                          "first_below_low_s": None}
    assert none["held"]["below_low_s"] == 50.0 and none["held"]["first_below_low_s"] == 250.0
    assert none["oom_kills"] == 1 and "worst" not in none["phases"][0]
    assert [p["worst"] for p in hv["phases"]] == ["high", "soft", "low", "soft"]
    assert [p["at_end"] for p in hv["phases"]] == ["high", "high", "soft", "high"]
    assert hv["time_in_state_s"] == {"high": 61.0 + 31.0 + 100.0, "soft": 89.0 + 40.0,
                                     "low": 19.0, "hard": 80.0}
    assert hv["phases"][1]["above_min_mib"] == 2048.0 and hv["phases"][2]["covered"] is False
    assert hv["phases"][0]["passes_per_s"]["oc-web"] == pytest.approx(2.0, abs=0.05)
    assert hv["bursts_passes_per_s"]["oc-web"] == pytest.approx(1.0, abs=0.05)
    r.summary, r.plot = s, tmp_path / "o.png"
    text = overcommit.format_result(r)
    assert "shape holds" in text and "series none" in text and "GUEST-OOM-KILLS" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tight_layout (or any other) warning
        overcommit.save_plot(r)
    assert r.plot.stat().st_size > 10_000


def test_misses_are_named() -> None:
    # Free memory falls under low after the grace, a guest is OOM-killed, the low burst
    # never recovers, nothing is given back, a VM is left paused.
    states = [(61.0, "soft"), (150.0, "high"), (181.0, "low")]
    flat_target = {50.0: 1024, 170.0: 780, 290.0: 580, 410.0: 600}
    free = {**GOOD_FREE, 180: 150, 194: 150}
    r = OvercommitResult(config(), {"hv": series(free, flat_target, states, paused_last=True,
                                                 oom=2)})
    text = " | ".join(analyse(r)["misses"])
    # Judged from the first 2-s sample after the grace (196 s) to the release (300 s).
    assert GRACE_S == 15.0 and "under the low threshold (246 MiB) for 104 s" in text
    assert "guest OOM kills: 2" in text
    assert "phase low: still low at its end" in text
    assert "targets did not rise" in text
    assert "left paused at the end: oc-web" in text
    quiet = analyse(OvercommitResult(config(), {"hv": series(GOOD_FREE, GOOD_TARGET, [])}))
    assert any("never took hv out of high" in m for m in quiet["misses"])


def test_only_baselines_judge_nothing() -> None:
    r = OvercommitResult(config(), {"balloon": series({**GOOD_FREE, 250: 10}, GOOD_TARGET,
                                                      GOOD_STATES, paused_last=True, oom=3)})
    r.summary = analyse(r)
    assert r.summary["misses"] == [] and r.complete
    assert r.summary["series"]["balloon"]["paused_at_end"] == ["oc-web"]
    assert "nothing judged" in overcommit.format_result(r)


def test_phase_rate_needs_two_readings() -> None:
    pts = [{"t_s": 0.0, "passes": {"w": 0}}, {"t_s": 10.0, "passes": {"w": 25}},
           {"t_s": 20.0, "passes": {"w": None}}]
    assert phase_rate(pts, "w", 0, 20) == 2.5
    assert phase_rate(pts, "w", 5, 20) is None
