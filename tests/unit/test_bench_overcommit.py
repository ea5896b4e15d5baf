"""hv bench overcommit's analysis and report (pure), on synthetic runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from hv.bench import overcommit
from hv.bench.overcommit import OvercommitResult, analyse
from hv.errors import UsageError
from hv.units import MiB

NAMES = ("oc-a", "oc-b")


def parse(*argv: str) -> overcommit.OvercommitConfig:
    p = argparse.ArgumentParser()
    overcommit.add_arguments(p)
    return overcommit.config_from_args(p.parse_args(list(argv)))


@pytest.mark.parametrize("argv", [["--minutes", "1"], ["--minutes", "nan"], ["--min", "0"],
                                  ["--min", "800M"], ["--period", "inf"],
                                  ["--minutes", "2", "--period", "30"], ["--prefix", "a/b"]])
def test_bad_input_is_one_usage_error(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(*argv)


def phases() -> list[dict[str, Any]]:
    return [{"phase": "before", "level_pct": None, "start_s": 0.0, "end_s": 60.0},
            {"phase": "soft", "level_pct": 3.0, "start_s": 60.0, "end_s": 180.0},
            {"phase": "hard", "level_pct": 1.5, "start_s": 180.0, "end_s": 300.0},
            {"phase": "released", "level_pct": None, "start_s": 300.0, "end_s": 420.0}]


def ticks(resident_mib: dict[float, int], target_mib: dict[float, int],
          paused_last: bool = False) -> list[dict[str, Any]]:
    out = []
    for t in sorted(resident_mib):
        for n in NAMES:
            out.append({"t_s": t, "vm": n, "resident_bytes": resident_mib[t] * MiB // 2,
                        "target_bytes": target_mib[t] * MiB // 2, "swap_bytes": 0,
                        "balloon_bytes": 512 * MiB, "free_bytes": 900 * MiB,
                        "paused_by_hv": paused_last and t == max(resident_mib) and n == "oc-b"})
    return out


GOOD_RESIDENT = {50.0: 1000, 170.0: 800, 290.0: 600, 410.0: 700}
GOOD_TARGET = {50.0: 1024, 170.0: 780, 290.0: 580, 410.0: 1024}


def test_a_run_that_reclaims_and_gives_back_holds_the_shape(tmp_path: Path) -> None:
    states = [(61.0, "soft"), (150.0, "high"), (181.0, "hard"), (200.0, "soft"), (280.0, "high")]
    r = OvercommitResult({"vms": {n: {"mib": 512, "shares": 1000, "workload": "idle"} for n in NAMES}},
                         phases(), ticks(GOOD_RESIDENT, GOOD_TARGET), states)
    s = analyse(r)
    assert s["misses"] == []
    assert [p["worst"] for p in s["phases"]] == ["high", "soft", "hard", "high"]
    assert [p["at_end"] for p in s["phases"]] == ["high", "high", "high", "high"]
    assert s["time_in_state_s"] == {"high": 61.0 + 31.0 + 140.0, "soft": 89.0 + 80.0, "hard": 19.0}
    r.summary, r.plot = s, tmp_path / "o.png"
    text = overcommit.format_result(r)
    assert "shape holds" in text and "hard" in text
    overcommit.save_plot(r)
    assert r.plot.stat().st_size > 10_000


def test_misses_are_named() -> None:
    # The hard phase never recovers, nothing is given back, a VM is left paused.
    states = [(61.0, "soft"), (150.0, "high"), (181.0, "hard")]
    flat_target = {50.0: 1024, 170.0: 780, 290.0: 580, 410.0: 600}
    s = analyse(OvercommitResult({}, phases(), ticks(GOOD_RESIDENT, flat_target, True), states))
    text = " | ".join(s["misses"])
    assert "phase hard: still hard at its end" in text
    assert "targets did not rise" in text
    assert "left paused at the end: oc-b" in text
    quiet = analyse(OvercommitResult({}, phases(), ticks({t: 1000 for t in GOOD_RESIDENT},
                                                          GOOD_TARGET), []))
    assert any("never took hv out of high" in m for m in quiet["misses"])
    assert any("resident memory did not fall" in m for m in quiet["misses"])
