"""hv bench balloon's pure parts: argument checks, throughput, per-size rows and the shape."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from hv.bench import balloon
from hv.bench.balloon import BALLOON_TOLERANCE, BalloonResult, shape_rows, throughput
from hv.errors import UsageError
from hv.units import MiB


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    balloon.add_arguments(p)
    return p.parse_args(list(argv))


def test_defaults_give_five_sizes_largest_first() -> None:
    cfg = balloon.config_from_args(args())
    assert cfg.sizes_mib == (448, 384, 320, 256, 192)
    assert (cfg.mem_bytes, cfg.workload, cfg.disk_mib) == (512 * MiB, "pagecache", 200)
    assert dict(cfg.params())["file_loop"] == "2"  # blocks at random
    assert dict(balloon.config_from_args(args("--access", "cyclic")).params())["file_loop"] == "1"
    toucher = balloon.config_from_args(args("--workload", "toucher", "--ws", "32"))
    assert toucher.disk_mib == 512  # the toucher's guests read a disk their size once
    assert dict(toucher.params())["alloc_mib"] == "32" and "file_loop" not in dict(toucher.params())


@pytest.mark.parametrize("argv, words", [
    (["--sizes", "a,b"], "numbers separated by commas"),
    (["--sizes", "256,256"], "must differ"),
    (["--sizes", "600"], "above the ballooned guests' 512 MiB"),
    (["--sizes", "64"], "too small"),                       # below the balloon floor
    (["--workload", "toucher", "--ws", "200", "--sizes", "256"], "too small"),
    (["--window", "1"], "at least 3 seconds"),
    (["--window", "nan"], "at least 3 seconds"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--window", "12", "--rounds", "5"], "slices of at least 3 seconds"),
    (["--file", "0"], "at least 1 MiB"),
    (["-m", "300.5M"], "whole number of MiB"),
])
def test_bad_input_is_one_usage_error(argv: list[str], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        balloon.config_from_args(args(*argv))


def test_throughput_is_count_per_guest_second_between_first_and_last_line() -> None:
    assert throughput([(10.0, 100), (11.0, 180), (14.0, 500)]) == pytest.approx(100.0)
    assert throughput([(3.0, 7)]) is None
    assert throughput([(3.0, 7), (3.0, 9)]) is None  # no guest time elapsed


def run_(x: int, series: str, rate: float | None, reached: bool = True) -> dict[str, Any]:
    return {"size_mib": x, "series": series, "throughput": rate, "reached": reached}


def test_rows_hold_within_the_tolerance_and_name_every_miss() -> None:
    inside = 1 - BALLOON_TOLERANCE + 0.01
    runs = [run_(384, "configured", 100.0), run_(384, "ballooned", 100 * inside),
            run_(384, "swapped", 40.0),
            run_(256, "configured", 50.0), run_(256, "ballooned", 40.0),
            run_(256, "swapped", 45.0, reached=False),
            run_(192, "configured", 30.0), run_(192, "ballooned", 30.0)]
    big, mid, small = shape_rows(runs, (384, 256, 192))
    assert big["shape_holds"] and big["misses"] == []
    assert big["ballooned_ratio"] == pytest.approx(inside) and big["swapped_ratio"] == 0.4
    assert not mid["shape_holds"]
    assert mid["misses"] == ["ballooned -20.0 % from configured (bound 10 %)",
                             "swapped never got down to 256 MiB"]
    assert small["misses"] == ["no swapped throughput"] and small["swapped_ratio"] is None
    res = BalloonResult({}, runs, [big])
    assert res.complete
    res.rows = [big, mid, small]
    assert not res.complete and not BalloonResult({}, []).complete


def test_format_result_shows_every_size_and_the_misses() -> None:
    runs = [run_(320, s, r) for s, r in (("configured", 80.0), ("ballooned", 60.0),
                                          ("swapped", 20.0))]
    res = BalloonResult({"workload": "pagecache"}, runs, shape_rows(runs, (320,)))
    text = balloon.format_result(res)
    assert "CONFIGURED MiB/s" in text and "75.0%" in text and "25.0%" in text
    assert "MISSED" in text and "X=320 MiB: ballooned -25.0 %" in text


def test_slices_rotate_so_no_series_always_follows_another() -> None:
    order = balloon.rotation(["c", "b", "s"], 3)
    assert order == ["c", "b", "s", "b", "s", "c", "s", "c", "b"]
    # Each series takes each place in a round once.
    assert {tuple(order[i::3]) for i in range(3)} == {("c", "b", "s"), ("b", "s", "c"),
                                                        ("s", "c", "b")}


def test_pooled_throughput_is_the_slices_counts_over_their_guest_time() -> None:
    # 20 in 2 s, then 30 in 2 s after a pause: 50 in 4 s; the pause does not count.
    got = balloon.pooled_throughput([[(0.0, 0), (1.0, 10), (2.0, 20)], [(10.0, 20), (12.0, 50)]])
    assert got == pytest.approx(12.5)
    assert balloon.pooled_throughput([[(3.0, 7)]]) is None
