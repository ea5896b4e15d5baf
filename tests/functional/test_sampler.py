"""The working-set sampler on real guests, run by `hv run` (no overcommit: state high).

Truth for the toucher: its working set is the first W MiB of its allocation, touched
once a second, so the fraction of *sampleable* pages (present, not zero-page, not
KSM: the pages the sampler draws from) that it touches in a period is
``W MiB / (sampleable pages * 4 KiB)``, plus the guest kernel's own activity (an
idle guest's, measured beside it, is a few percent of a smaller set of pages).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from hv.units import MiB, PAGE_SIZE
from tests.conftest import wait_for
from tests.functional.hvrun import HvRun, swap_fixture, write_config

pytestmark = pytest.mark.guest

PERIOD_S = 4.0
SAMPLE_PAGES = 200   # binomial noise ~3.5 points at f = 0.5, vs 5 at the default 100
WS1_MIB, WS2_MIB, PHASE1_S = 40, 120, 36
TOLERANCE = 0.15     # the bound, percentage points as a fraction


@pytest.fixture(scope="module")
def host_swap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield from swap_fixture(tmp_path_factory)


def expected(ws_mib: int, sampleable: int) -> float:
    return min(1.0, ws_mib * MiB / (sampleable * PAGE_SIZE))


def test_sampler_tracks_working_set(guests, host_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    idle = guests.launch("idle1", mem="256M", workload="idle")
    toucher = guests.launch("touch1", mem="256M", workload="toucher", alloc_mib=160,
                            ws=f"{WS1_MIB}:{PHASE1_S},{WS2_MIB}")
    guests.wait_event(toucher, "toucher_filled", timeout_s=60)
    config = write_config(tmp_path / "hv.toml", {
        "sample_pages": SAMPLE_PAGES, "sample_period_s": PERIOD_S, "poll_interval_s": 1,
        "share_interval_s": 0,  # sharing off: this test measures the sampler alone
    }, {
        "idle1": {"socket": idle["socket"], "min": "128M"},
        "touch1": {"socket": toucher["socket"], "min": "128M"},
    })
    hv = HvRun(config, tmp_path / "events.jsonl")
    try:
        # Phase 1 (40 MiB): from the third period on, the fast average is within
        # 15 points of the truth.
        change = guests.wait_event(toucher, "toucher_ws", timeout_s=PHASE1_S + 30)
        changed_at = time.time()
        assert int(change["ws_mib"]) == WS2_MIB
        phase1 = [e for e in hv.events("sample", vm="touch1") if e["ts"] < changed_at - 1]
        assert len(phase1) >= 4, phase1
        for e in phase1[2:]:
            truth = expected(WS1_MIB, e["sampleable"])
            print(f"touch1 phase 1: fast {e['fast']:.3f} current {e['fraction']:.3f} "
                  f"truth {truth:.3f} ({e['touched']}/{e['sampled']}, sampleable {e['sampleable']})")
            assert abs(e["fast"] - truth) <= TOLERANCE, (e, truth)

        # Phase 2 (120 MiB): within two periods after the change, fast follows.
        def two_after() -> list[dict[str, object]]:
            hv.check_alive()
            got = [e for e in hv.events("sample", vm="touch1") if e["ts"] > changed_at]
            return got if len(got) >= 2 else []
        after = wait_for(two_after, 3 * PERIOD_S + 10, "two sampling periods after the change")
        e = after[1]
        truth = expected(WS2_MIB, e["sampleable"])
        print(f"touch1 phase 2: fast {e['fast']:.3f} truth {truth:.3f} after two periods")
        assert abs(e["fast"] - truth) <= TOLERANCE, (e, truth)

        # The idle guest stays low.
        idle_samples = hv.events("sample", vm="idle1")
        assert len(idle_samples) >= 5
        last = idle_samples[-1]
        print(f"idle1: slow {last['slow']:.3f} fast {last['fast']:.3f} over "
              f"{len(idle_samples)} periods; currents {[round(s['fraction'], 3) for s in idle_samples]}")
        assert last["slow"] < 0.15 and last["fast"] < e["fast"] - 0.2

        # Ticks carry the estimates; nothing was ballooned, swapped or paused (state high).
        tick = hv.events("tick", vm="touch1")[-1]
        assert tick["active"]["periods"] >= 5 and tick["state"] == "high"
        assert not hv.events("swap") and not hv.events("pause")
    finally:
        stopped = hv.stop()  # always stop hv; judge how it stopped once the test's own checks ran
    assert stopped == 0, hv.stderr()
    assert not hv.events("ksm_raised")  # sharing off: KSM left alone
    assert (state_dir / "vms" / "touch1" / "estimator.json").exists()
