"""The working-set sampler on real guests: run by `hv run` (no overcommit: state
high), and driven directly on VM time (a paused guest is not read as idle; the
in-period estimate shows growth before its period ends).

Truth for the toucher: its working set is the first W MiB of its allocation, touched
once a second, so the fraction of *sampleable* pages (present, not zero-page, not
KSM: the pages the sampler draws from) that it touches in a period is
``W MiB / (sampleable pages * 4 KiB)``, plus the guest kernel's own activity (an
idle guest's, measured beside it, is a few percent of a smaller set of pages).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from hv.host import proc
from hv.policy import VMClock, WorkingSetEstimator
from hv.qemu.vm import VM
from hv.sampler import MAX_STRETCH, MIN_VM_FRACTION, SampleResult, Sampler, follow_vm_time
from hv.units import MiB, PAGE_SIZE
from tests.conftest import console_events, wait_for
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
        # Each read feeds the VM clock: read every second so a period lasts PERIOD_S
        # (in high the default reads idle VMs every 10 s, quantizing short periods).
        "idle_collect_s": 1,
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


# -- sampling on VM time, driven directly (no `hv run`) ---------------------------------

BUSY_MIB = 96          # toucher: allocation = working set, touched once a second
GROW_WS = "16:30,128"  # toucher: 16 MiB for 30 s after its fill, then 128 MiB
GROW_ALLOC_MIB = 160
LONG_PERIOD_S = 40.0   # VM time of the period the growth happens in (starts <= 20 s after fill)
RISE = 0.15            # in-period rise expected: ~0.28 (16 -> 128 of ~190 MiB, gain 0.5)
EARLY_S = 5.0          # "before the period ends": at least this long before its end


@contextlib.asynccontextmanager
async def on_vm_time(guest: dict[str, Any], pause: bool = False) -> AsyncIterator[tuple[VM, VMClock]]:
    """Attach to a guest (pausing it first if asked) and follow its VM time."""
    async with VM(guest["name"], guest["socket"]) as vm:
        if pause:
            await vm.pause()
            assert await vm.status() == "paused"
        clock = VMClock()

        async def running() -> bool:
            return await vm.status() == "running"

        follower = asyncio.create_task(
            follow_vm_time(clock, vm.info.pid, running, vm_name=guest["name"]))
        try:
            yield vm, clock
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower


def sampler_of(vm: VM) -> Sampler:
    return Sampler(vm.info.pid, [(r.hva, r.size) for r in vm.info.ram], SAMPLE_PAGES)


def vcpu_comms(pid: int) -> list[str]:
    out = []
    for tid in proc.vcpu_threads(pid):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            out.append(f.read().strip())
    return out


def test_paused_guest_is_not_read_as_idle(guests, host_swap):  # type: ignore[no-untyped-def]
    busy = guests.launch("busy1", mem="256M", workload="toucher", alloc_mib=BUSY_MIB)
    paused = guests.launch("paused1", mem="256M", workload="toucher", alloc_mib=BUSY_MIB)
    guests.wait_event(busy, "toucher_filled", timeout_s=60)
    guests.wait_event(paused, "toucher_filled", timeout_s=60)

    # The run-queue wait comes from QEMU's vCPU threads if it names them
    # (debug-threads=on), else from the sum over its threads but the main one.
    comms = vcpu_comms(busy["pid"])
    assert all(c.endswith(("/TCG", "/KVM")) for c in comms), comms
    print(f"busy1 vCPU threads by name: {comms or 'none (fallback)'}")
    wait0_s = proc.vcpu_runqueue_wait_s(busy["pid"])

    async def go() -> tuple[SampleResult, SampleResult, SampleResult, float, float]:
        async with on_vm_time(paused, pause=True) as (pvm, pclock), \
                on_vm_time(busy) as (bvm, bclock):
            psampler, bsampler = sampler_of(pvm), sampler_of(bvm)
            # On wall time (hv before VM time) the paused guest reads as idle ...
            wall = await psampler.period(PERIOD_S)
            # ... on VM time its period stretches to the cap and is discarded, while
            # the running guest beside it measures its working set.
            vm_time, active = await asyncio.gather(
                psampler.period(PERIOD_S, vm_clock=lambda: pclock.seconds),
                bsampler.period(PERIOD_S, vm_clock=lambda: bclock.seconds))
            return wall, vm_time, active, pclock.seconds, bclock.seconds

    wall, vm_time, active, paused_vm_s, busy_vm_s = asyncio.run(go())
    print(f"paused1 on wall time: {wall.touched}/{wall.sampled} f={wall.fraction}")
    print(f"paused1 on VM time: vm {vm_time.vm_s:.2f} s in {vm_time.wall_s:.1f} s: {vm_time.discarded}")
    truth = expected(BUSY_MIB, active.sampleable)
    print(f"busy1 on VM time: {active.touched}/{active.sampled} f={active.fraction} truth {truth:.3f}, "
          f"vm {active.vm_s:.2f} s in {active.wall_s:.2f} s wall; VM clocks {paused_vm_s:.2f} / {busy_vm_s:.2f} s")

    assert wall.sampled >= SAMPLE_PAGES // 2 and wall.fraction is not None
    assert wall.fraction <= 0.05  # the error VM time fixes: a paused, busy guest reads idle

    assert vm_time.discarded is not None and vm_time.fraction is None
    assert vm_time.vm_s is not None and vm_time.vm_s < MIN_VM_FRACTION * PERIOD_S
    assert vm_time.wall_s is not None and vm_time.wall_s >= MAX_STRETCH * PERIOD_S
    assert paused_vm_s == 0.0

    assert active.discarded is None and active.fraction is not None
    assert active.vm_s is not None and active.wall_s is not None
    # The VM clock moves in steps of one observation (follow_vm_time, every 1 s): a
    # period's VM time can exceed its wall time by up to one step, never more.
    assert active.vm_s >= PERIOD_S and active.wall_s + 1.5 >= active.vm_s
    # 96 MiB of ~190 MiB sampleable: about half (how much the guest kernel itself holds varies).
    assert truth > 0.3 and active.fraction >= truth - TOLERANCE, (active, truth)

    wait1_s = proc.vcpu_runqueue_wait_s(busy["pid"])
    assert 0.0 <= wait0_s <= wait1_s


def test_in_period_estimate_rises_before_the_period_ends(guests, host_swap):  # type: ignore[no-untyped-def]
    grow = guests.launch("grow1", mem="256M", workload="toucher", alloc_mib=GROW_ALLOC_MIB,
                         ws=GROW_WS)
    guests.wait_event(grow, "toucher_filled", timeout_s=60)
    est = WorkingSetEstimator()
    partials: list[tuple[float, int, float]] = []  # (monotonic s, touched so far, active)

    def on_partial(touched: int, sampled: int) -> None:
        partials.append((time.monotonic(), touched, est.observe_partial(touched, sampled)))

    async def go() -> tuple[SampleResult, float, SampleResult, float]:
        async with on_vm_time(grow) as (vm, clock):
            sampler = sampler_of(vm)
            seed = await sampler.period(PERIOD_S, vm_clock=lambda: clock.seconds)
            grown_early = console_events(grow["console"], "toucher_ws")
            assert not grown_early, f"the seed period ran into the growth (machine too slow): {seed}"
            assert seed.discarded is None
            before = est.update(seed.touched, seed.sampled)
            res = await sampler.period(LONG_PERIOD_S, vm_clock=lambda: clock.seconds,
                                       on_partial=on_partial)
            return seed, before, res, time.monotonic()

    seed, before, res, ended_at = asyncio.run(go())
    grown = console_events(grow["console"], "toucher_ws")
    rises = [(t, touched, a) for t, touched, a in partials if a >= before + RISE]
    print(f"grow1: seed {seed.touched}/{seed.sampled} active {before:.3f}; long period {res.touched}/{res.sampled} "
          f"vm {res.vm_s:.1f} s wall {res.wall_s:.1f} s; {len(partials)} partials, active "
          f"{[round(a, 2) for _, _, a in partials[::4]]}; first rise "
          f"{ended_at - rises[0][0] if rises else None} s before the end")
    assert grown and int(grown[-1]["ws_mib"]) == 128, grown  # the growth happened ...
    assert res.discarded is None and res.fraction is not None
    assert res.fraction >= before + 2 * RISE  # ... inside the long period
    # The active fraction rose during the period, well before it ended, and only rose.
    assert rises and ended_at - rises[0][0] >= EARLY_S, partials
    actives = [a for _, _, a in partials]
    assert actives == sorted(actives)
    assert [t for _, t, _ in partials] == sorted(t for _, t, _ in partials)
    # The period's full update takes over from the in-period estimate.
    est.update(res.touched, res.sampled)
    assert est.in_period is None and est.active_fraction >= actives[-1] - 1e-9
